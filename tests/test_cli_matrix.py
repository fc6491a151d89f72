"""deploy.py --list / --dry-run / --help through Typer's CliRunner: exact output fragments
and exit codes; and, in real subprocesses, proof that these commands never import modal."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

import deploy

ROOT = Path(__file__).resolve().parent.parent
GPUS = ["l40s", "a100", "h100", "h200", "b200"]
MODELS = ["gemma-3-12b", "gemma-3-27b", "qwen3-vl-30b"]

GEMMA_27B_ON_2_L40S = (
    "vllm serve google/gemma-3-27b-it --served-model-name google/gemma-3-27b-it gemma-3-27b "
    "--host 127.0.0.1 --port 8000 --dtype bfloat16 --max-model-len 32768 "
    "--gpu-memory-utilization 0.92 --tensor-parallel-size 2 "
    "--limit-mm-per-prompt '{\"image\":4,\"video\":0}' --enforce-eager"
)
QWEN_ON_2_L40S = (
    "vllm serve Qwen/Qwen3-VL-30B-A3B-Instruct --served-model-name "
    "Qwen/Qwen3-VL-30B-A3B-Instruct qwen3-vl-30b --host 127.0.0.1 --port 8000 "
    "--dtype bfloat16 --max-model-len 32768 --gpu-memory-utilization 0.92 "
    "--tensor-parallel-size 2 --enable-auto-tool-choice --tool-call-parser hermes "
    "--limit-mm-per-prompt '{\"image\":4,\"video\":0}' --enforce-eager"
)
GEMMA_12B_ON_L40S = (
    "vllm serve google/gemma-3-12b-it --served-model-name google/gemma-3-12b-it gemma-3-12b "
    "--host 127.0.0.1 --port 8000 --dtype bfloat16 --max-model-len 32768 "
    "--gpu-memory-utilization 0.92 --tensor-parallel-size 1 "
    "--limit-mm-per-prompt '{\"image\":4,\"video\":0}' --enforce-eager"
)


def run(*args: str, env: dict | None = None):
    """deploy.py in-process; output is stdout and stderr as a user sees them, 80 columns."""
    return CliRunner().invoke(deploy.cli, list(args), env={"COLUMNS": "80", **(env or {})})


def ok(*args: str):
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output, result.output
    return result.output


# ## --list


def test_list_shows_the_matrix_apps_and_endpoint_counts():
    out = ok("--list")
    for fragment in [
        "Models x GPUs (models.yaml): per replica, GPUs (tensor parallel),",
        "GPU-based: 5 endpoints, within Modal's Starter limit of 8",
        "Legacy: 15 endpoints, exceeds Modal's Starter limit of 8",
        "Legacy apps are named vllm-<model>-<gpu>, e.g. vllm-gemma-3-12b-l40s",
        "│ vllm-h100 │ https://<workspace>--vllm-h100-serve.modal.run │ 3      │",
    ]:
        assert fragment in out, out
    for gpu in GPUS:
        assert f"vllm-{gpu}" in out, out
    for model in MODELS:
        assert model in out, out
    # gemma-3-27b: two L40S ($3.90/h of GPUs + $0.40/h for the 5 cores and 20 GiB its
    # replica reserves), 170k tokens of KV cache; one GPU elsewhere (test_config.py).
    rows = [line for line in out.splitlines() if line.startswith("│")]
    assert rows[3:6] == [
        "│ gemma-3-27b  │  2 GPUs  │  1 GPU   │  1 GPU   │  1 GPU   │  1 GPU   │",
        "│              │ $4.30/h  │ $2.80/h  │ $4.25/h  │ $4.84/h  │ $6.55/h  │",
        "│              │ 170k tok │ 98k tok  │ 45k tok  │ 209k tok │ 207k tok │",
    ], out
    assert ("$/hour = GPUs + the CPU and memory each replica reserves (Modal bills both; "
            "$0.04716/core, $0.007992/GiB per hour, read 2026-06-27), e.g. gemma-3-12b on "
            "l40s: $1.95 GPU + $0.19 CPU (4 cores) + $0.11 memory (14 GiB). GPU apps add "
            "$0.06/h for their CPU router while up.") in " ".join(out.split()), out
    assert "no fit" not in out, out


def _readme_block(starting: str) -> str:
    """The fenced block of README.md whose first line starts with `starting`."""
    blocks = re.findall(r"^```\n(.*?)^```$", (ROOT / "README.md").read_text(),
                        re.MULTILINE | re.DOTALL)
    return next(b for b in blocks if b.startswith(starting))


def test_list_fits_80_columns_and_the_readme_shows_it_as_it_is():
    out = ok("--list")
    assert max(len(line) for line in out.splitlines()) <= 80, out
    assert all(line == line.rstrip() for line in out.splitlines()), out
    assert _readme_block("Models x GPUs (models.yaml)") == out


def test_list_json_has_every_cell_with_gpu_string_and_headroom():
    data = json.loads(ok("--list", "--json"))
    assert data["endpoints"] == {"gpu_based": 5, "legacy": 15, "starter_plan_limit": 8}
    assert list(data["models"]) == MODELS
    assert list(data["gpus"]) == GPUS
    assert data["gpus"]["a100"] == {"modal_gpu": "A100-80GB", "vram_gb": 80,
                                    "usd_per_hour": 2.5}
    strings = {(m, g): cell["gpu"] for m, model in data["models"].items()
               for g, cell in model["cells"].items()}
    assert strings == {
        (m, g): ("L40S:2" if g == "l40s" and m != "gemma-3-12b" else
                 {"l40s": "L40S", "a100": "A100-80GB", "h100": "H100", "h200": "H200",
                  "b200": "B200"}[g])
        for m in MODELS for g in GPUS
    }
    cell = data["models"]["gemma-3-27b"]["cells"]["l40s"]
    assert cell == {
        "fits": True, "gpu": "L40S:2", "gpu_count": 2, "tensor_parallel_size": 2,
        "kv_cache_tokens": 169_958, "need_gib": 61.9, "budget_gib": 82.3,
        "usd_per_hour": 4.3, "usd_per_hour_split": {"gpu": 3.9, "cpu": 0.2358, "memory": 0.1598},
        "cpu_cores": 5.0, "memory_mib": 20480, "legacy_app": "vllm-gemma-3-27b-l40s",
    }
    assert data["billing"] == {
        "cpu_core_usd_per_hour": 0.04716, "memory_gib_usd_per_hour": 0.007992,
        "read_on": "2026-06-27", "source": "https://www.beam.cloud/blog/modal-pricing-explained",
        "router_usd_per_hour": 0.0552}
    assert data["apps"][0] == {"app": "vllm-l40s",
                               "url": "https://<workspace>--vllm-l40s-serve.modal.run",
                               "models": MODELS}


BROKEN_AND_HUGE = textwrap.dedent("""\
    defaults: {vllm_version: "0.33.0"}
    gpus:
      l40s: {modal_gpu: L40S, vram_gb: 48, usd_per_hour: 1.95}
    models:
      tiny: {huggingface_id: org/tiny, params_b: 1, layers: 4, attention_heads: 8,
             kv_heads: 2, head_dim: 64, max_model_len: 4096}
      huge: {huggingface_id: org/huge, params_b: 1000, layers: 10, attention_heads: 8,
             kv_heads: 8, head_dim: 128, max_model_len: 4096}
    """)


@pytest.fixture
def huge_config(tmp_path) -> Path:
    path = tmp_path / "huge.yaml"
    path.write_text(BROKEN_AND_HUGE)
    return path


def test_list_marks_a_cell_that_cannot_fit_with_its_reason(huge_config):
    out = ok("--list", "--config", str(huge_config))
    assert "(huge.yaml)" in out, out
    assert "│ huge  │  no fit   │" in out.splitlines(), out
    assert ("huge on l40s does not fit: needs 1886.8 GiB at max_model_len 4096, "
            "more than 8 x 48 GB x 0.92 allows") in out.splitlines(), out
    assert "GPU-based: 1 endpoints" in out, out
    assert "Legacy: 1 endpoints, within Modal's Starter limit of 8" in out, out


def test_config_path_from_the_environment(huge_config):
    result = run("--list", "--json", env={"MODAL_VLLM_CONFIG": str(huge_config)})
    assert result.exit_code == 0, result.output
    assert list(json.loads(result.output)["models"]) == ["tiny", "huge"], result.output


# ## --dry-run


def test_dry_run_one_gpu_shows_app_endpoint_secrets_volumes_and_commands():
    out = ok("--gpu", "l40s", "--dry-run")
    lines = out.splitlines()
    assert lines[0] == "vllm-l40s (gpu app)", out
    for fragment in [
        ("  endpoint   https://<workspace>--vllm-l40s-serve.modal.run  "
        "(function 'serve', the only one)"),
        "  secrets    vllm-api-key, huggingface",
        ("  volumes    huggingface-cache at /root/.cache/huggingface, "
        "vllm-cache at /root/.cache/vllm"),
        "  image      vllm==0.33.0",
        "  gemma-3-12b (google/gemma-3-12b-it) on L40S",
        "  gemma-3-27b (google/gemma-3-27b-it) on L40S:2",
        "  qwen3-vl-30b (Qwen/Qwen3-VL-30B-A3B-Instruct) on L40S:2",
        "  router     $0.06/h while up (1 core, 1 GiB; it scales to zero too)",
        ("    cost     $4.30/h per running replica; idle it scales to zero after 15 min "
        "(each idle tail ≈ $1.07)"),
        ("    reserves 5 CPU cores, 20 GiB memory: $3.90 GPU + $0.24 CPU + $0.16 memory "
         "per hour"),
        ("    reserves 4 CPU cores, 14 GiB memory: $1.95 GPU + $0.19 CPU + $0.11 memory "
         "per hour"),
        "    scaling  0 to 4 replicas, 32 requests each",
        "    secrets  huggingface",
        "    secrets  none",  # Qwen is not gated
        f"    command  {GEMMA_12B_ON_L40S}",
        f"    command  {GEMMA_27B_ON_2_L40S}",
        f"    command  {QWEN_ON_2_L40S}",
        ("Dry run: 1 app(s), nothing deployed. "
        "Without --dry-run this needs a Modal token (uv run modal token new)."),
    ]:
        assert fragment in lines, out


def test_the_readme_shows_a_dry_run_as_it_prints():
    """The README's dry-run block is the real output, so its prices cannot go stale."""
    assert _readme_block("vllm-l40s (gpu app)") == ok("--gpu", "l40s", "--dry-run")


def test_dry_run_all_shows_five_apps_and_fifteen_pools():
    out = ok("--all", "--dry-run")
    apps = [line for line in out.splitlines() if line.endswith("(gpu app)")]
    assert apps == [f"vllm-{gpu} (gpu app)" for gpu in GPUS], out
    commands = [line for line in out.splitlines() if line.startswith("    command  vllm serve")]
    assert len(commands) == 15, out
    assert sum("--tensor-parallel-size 2" in c for c in commands) == 2, out
    assert all("--host 127.0.0.1" in c and "--enforce-eager" in c for c in commands), out
    assert "  gemma-3-27b (google/gemma-3-27b-it) on H100" in out, out
    assert "    cost     $6.55/h per running replica" in out, out
    assert "Dry run: 5 app(s), nothing deployed." in out, out


def test_dry_run_one_legacy_app():
    out = ok("--model", "gemma-3-12b-l40s", "--dry-run")
    lines = out.splitlines()
    assert lines[0] == "vllm-gemma-3-12b-l40s (legacy app)", out
    assert ("  endpoint   https://<workspace>--vllm-gemma-3-12b-l40s-serve.modal.run  "
            "(function 'serve', the only one)") in lines, out
    assert f"    command  {GEMMA_12B_ON_L40S}" in lines, out
    assert "    cost     $2.25/h per running replica; idle it scales to zero after 15 min " \
           "(each idle tail ≈ $0.56)" in lines, out
    assert not any(line.startswith("  router") for line in lines), out  # no router: legacy


def test_dry_run_json_carries_the_argv_and_costs():
    (app,) = json.loads(ok("--gpu", "L40S", "--dry-run", "--json"))
    assert (app["app"], app["kind"], app["endpoint"]) == (
        "vllm-l40s", "gpu", "https://<workspace>--vllm-l40s-serve.modal.run")
    assert app["secrets"] == ["vllm-api-key", "huggingface"]
    assert app["volumes"] == {"/root/.cache/huggingface": "huggingface-cache",
                              "/root/.cache/vllm": "vllm-cache"}
    pools = {p["model"]: p for p in app["pools"]}
    qwen = pools["qwen3-vl-30b"]
    assert qwen["gpu"] == "L40S:2"
    assert qwen["command"][qwen["command"].index("--tool-call-parser") + 1] == "hermes"
    assert qwen["command"][qwen["command"].index("--limit-mm-per-prompt") + 1] == (
        '{"image":4,"video":0}')
    assert (qwen["scaledown_window_seconds"], qwen["usd_per_hour_per_replica"],
            qwen["usd_per_idle_tail"]) == (900, 4.3, 1.07)
    assert (qwen["usd_per_hour_split"], qwen["cpu_cores"], qwen["memory_mib"]) == (
        {"gpu": 3.9, "cpu": 0.2358, "memory": 0.1598}, 5.0, 20480)
    assert app["router_usd_per_hour"] == 0.0552
    assert app["not_served"] == {}


# ## Usage errors (exit 2), config errors (exit 3)


NO_ACTION = ("Error: choose one action: --list, --gpu KEY, --all or --model MODEL-GPU; or "
             "operate: --url KEY, --status, --stop KEY; or test: --test-gpu KEY, --test "
             "MODEL-GPU, --warm KEY, --bench KEY; or --batch KEY; or --serve-local, --upload-adapter, "
             "--litellm-config, --report (--help shows them all)")


@pytest.mark.parametrize(("args", "line"), [
    (["--list", "--all"], "Error: choose one of --list, --all"),
    (["--gpu", "h100", "--model", "gemma-3-12b-h100", "--dry-run"],
     "Error: choose one of --gpu, --model"),
    ([], NO_ACTION),
    (["--dry-run"], NO_ACTION),
    (["--list", "--dry-run"], "Error: --dry-run goes with --gpu, --all, --model or --batch, not --list"),
    (["--gpu", "a10g", "--dry-run"],
     "Error: unknown GPU 'a10g'; valid GPU keys: l40s, a100, h100, h200, b200"),
    (["--model", "llama-3-h100", "--dry-run"],
     ("Error: unknown model-GPU key 'llama-3-h100'; expected <model>-<gpu> with models "
     "gemma-3-12b, gemma-3-27b, qwen3-vl-30b and GPUs l40s, a100, h100, h200, b200 (e.g. "
     "gemma-3-12b-l40s, gemma-3-12b-a100, gemma-3-12b-h100, gemma-3-12b-h200, "
     "gemma-3-12b-b200)")),
    (["--gpu", "[/red]", "--dry-run"],
     "Error: unknown GPU '[/red]'; valid GPU keys: l40s, a100, h100, h200, b200"),
    # click's own errors, each as one line naming the option as typed
    (["--list", "--colour"], "Error: unknown option --colour; did you mean --url?"),
    (["--list", "--jsn"], "Error: unknown option --jsn; did you mean --env, --json or --yes?"),
    (["--list", "--zzzzz"], "Error: unknown option --zzzzz (--help lists them)"),
    (["--gpu"], "Error: --gpu needs a value (KEY)"),
    (["--upload-adapter", "gemma-3-12b", "x"],
     "Error: --upload-adapter needs 3 values (MODEL NAME DIR)"),
    (["--bench", "h100", "--requests", "many"],
     "Error: --requests: expected a whole number, not 'many'"),
    (["--bench", "h100", "--max-ttft-ms", "fast"],
     "Error: --max-ttft-ms: expected a number, not 'fast'"),
    (["--list=yes"], "Error: --list is a flag: it takes no value"),
    (["--list", "true"],
     "Error: unexpected argument 'true': every value follows its option (--help lists them)"),
])
def test_usage_errors_are_one_line_on_stderr_exit_2(args, line):
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert result.stderr == line + "\n", result.stderr
    assert result.stdout == "", result.stdout


# ## Every value checked before anything slow


@pytest.mark.parametrize(("args", "line"), [
    (["--warm", "h100", "--deadline", "0"], "Error: --deadline must be longer than 0, not '0'"),
    (["--test-gpu", "h100", "--api-key", "k", "--deadline", "0.0m"],
     "Error: --deadline must be longer than 0, not '0.0m'"),
    (["--warm", "h100", "--deadline", "soon"],
     "Error: --deadline: cannot read duration 'soon'; use e.g. 90s, 15m or 2h"),
    (["--warm", "h100", "--keep-warm", "-1h"],
     "Error: --keep-warm: cannot read duration '-1h'; use e.g. 90s, 15m or 2h"),
    (["--warm", "h100", "--keep-warm", "0m"], "Error: --keep-warm must be longer than 0, not '0m'"),
    (["--bench", "h100", "--max-ttft-ms", "-1"],
     "Error: --max-ttft-ms must be a number above 0, not -1"),
    (["--bench", "h100", "--max-tpot-ms", "nan"],
     "Error: --max-tpot-ms must be a number above 0, not nan"),
    (["--bench", "h100", "--max-tpot-ms", "inf"],
     "Error: --max-tpot-ms must be a number above 0, not inf"),
    (["--bench", "h100", "--concurrency", "0"], "Error: --concurrency must be at least 1, not 0"),
    (["--bench", "h100", "--requests", "-5"], "Error: --requests must be at least 1, not -5"),
    (["--bench", "h100", "--input-len", "0"], "Error: --input-len must be at least 1, not 0"),
    (["--bench", "h100", "--output-len", "0"], "Error: --output-len must be at least 1, not 0"),
    (["--bench", "h100", "--results-dir", str(ROOT / "README.md")],
     f"Error: --results-dir {ROOT / 'README.md'}: exists and is not a directory"),
    (["--test-gpu", "h100", "--base-url", "ftp://x"],
     "Error: --base-url 'ftp://x': expected an http(s):// URL"),
    (["--warm", "h100", "--base-url", "localhost:8000"],
     "Error: --base-url 'localhost:8000': expected an http(s):// URL"),
    (["--test-gpu", "h100", "--base-url", "http://x:99999"],
     "Error: --base-url 'http://x:99999': not a valid URL (Port out of range 0-65535)"),
    (["--test-gpu", "h100", "--api-key", ""], "Error: --api-key is empty"),
    (["--warm", "h100", "--test-model", " "], "Error: --test-model is empty"),
    (["--url", "h100", "--format", "yaml"], "Error: --format 'yaml': choose one of url, env, json"),
    (["--status", "--env", " "], "Error: --env is empty"),
])
def test_every_value_is_checked_before_anything_slow(monkeypatch, args, line):
    """With a Modal token set and modal unimportable: a check that came after the token
    check or a lookup would fail otherwise than with its own line and exit 2."""
    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-testtokenid0001")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-testtokensecret0002")
    for module in ("modal", "cloud"):
        monkeypatch.setitem(sys.modules, module, None)  # `import modal` raises ImportError
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert result.stderr == line + "\n", result.stderr


# Valued options whose values are checked elsewhere, offline, before any lookup: the keys
# against the matrix, --upload-adapter's directory by adapters.py, --workspace by exports.py,
# --config by loading it, --output by writing it, and --serve-local's by the local gateway.
CHECKED_ELSEWHERE = {"gpu", "model", "url", "stop", "test_gpu", "test", "warm", "bench",
                     "upload_adapter", "workspace", "config_path", "output",
                     "upstream", "host", "port", "batch", "input_file"}


def test_every_valued_option_has_its_check():
    import typer.main

    valued = {p.name for p in typer.main.get_command(deploy.cli).params
              if not getattr(p, "is_flag", False)}
    assert valued - set(deploy.VALUES) == CHECKED_ELSEWHERE
    assert set(deploy.VALUES) <= valued


def test_format_choices_are_the_exports():
    import exports

    assert [deploy.VALUES["fmt"]("--format", f) for f in exports.FORMATS] == [None] * 3
    assert deploy.VALUES["fmt"]("--format", "yaml") is not None


def test_a_cell_that_does_not_fit_cannot_be_deployed(huge_config):
    result = run("--model", "huge-l40s", "--dry-run", "--config", str(huge_config))
    assert result.exit_code == 2, result.output
    assert result.output == ("Error: huge-l40s cannot be deployed: needs 1886.8 GiB at "
                             "max_model_len 4096, more than 8 x 48 GB x 0.92 allows\n")


def test_a_gpu_app_skips_a_model_that_does_not_fit(huge_config):
    out = ok("--gpu", "l40s", "--dry-run", "--config", str(huge_config))
    assert "  huge not served here: needs 1886.8 GiB at max_model_len 4096" in out, out
    assert "vllm serve org/huge" not in out, out


def test_a_broken_config_is_one_line_and_exit_3(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text("defaults: {vllm_version: '1'}\ngpus:\n  l40s: {vram_gb: 48}\nmodels: {}\n")
    result = run("--list", "--config", str(path))
    assert result.exit_code == 3, result.output
    assert result.output == (
        f"Error: {path}: gpus.l40s.modal_gpu: required key is missing\n"
        f"Error: {path}: gpus.l40s.usd_per_hour: required key is missing\n"
    ), result.output


def test_malformed_yaml_names_the_line_exit_3(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text("gpus:\n  l40s: [\n")
    result = run("--all", "--dry-run", "--config", str(path))
    assert result.exit_code == 3, result.output
    assert result.output.startswith(f"Error: {path}: line 3, column 1: "), result.output
    assert len(result.output.splitlines()) == 1, result.output


def test_a_missing_config_exit_3(tmp_path):
    result = run("--list", "--config", str(tmp_path / "nope.yaml"))
    assert result.exit_code == 3, result.output
    assert result.output == (
        f"Error: {tmp_path / 'nope.yaml'}: cannot read: No such file or directory\n"
    )


def test_a_long_error_stays_on_one_line_in_a_narrow_terminal():
    result = run("--model", "llama-3-h100", "--dry-run")
    assert result.exit_code == 2, result.output
    assert len(result.output.splitlines()) == 1, result.output
    assert len(result.output) > 80, result.output


# ## --help


def test_help_groups_the_options_and_shows_examples():
    result = CliRunner().invoke(deploy.cli, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for fragment in [
        "Deploy, test and operate vLLM endpoints on Modal.",
        "╭─ Matrix ", "╭─ Deploy (GPU-based: one endpoint per GPU type) ",
        "╭─ Legacy (one endpoint per model x GPU) ", "╭─ Output and configuration ",
        "--list", "--gpu", "--all", "--dry-run", "--model", "--json", "--config",
        "Examples",
        "uv run deploy.py --list ",
        "uv run deploy.py --all --dry-run ",
        "Exit codes",
        "env var: MODAL_VLLM_CONFIG",
    ]:
        assert fragment in result.output, result.output
    assert CliRunner().invoke(deploy.cli, ["-h"]).exit_code == 0


def _help_rows(out: str) -> dict[str, str]:
    """Option -> its help row (the first line of the row, between the panel's borders)."""
    rows = {}
    for line in out.splitlines():
        match = re.match(r"│ (--[\w-]+)", line)
        if match:
            rows[match[1]] = line
    return rows


def test_help_at_80_columns_labels_values_not_flags_and_wraps_no_example():
    result = CliRunner().invoke(deploy.cli, ["--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    out = result.output
    assert max(len(line) for line in out.splitlines()) <= 80, out
    assert not re.search(r"<(bool|str|int|float|path|Path)>", out), out
    rows = _help_rows(out)
    flags = ["--help", "--list", "--all", "--dry-run", "--serve-local", "--status", "--yes",
             "--json", "--verbose", "--redeploy", "--litellm-config", "--with-key"]
    for flag in flags:  # nothing between the option and its help text
        assert re.fullmatch(rf"│ {flag}( +-[a-z])? {{2,}}[A-Z][^│]*│", rows[flag]), rows[flag]
    for option, label in {"--gpu": "KEY", "--host": "HOST", "--port": "PORT",
                          "--deadline": "DURATION", "--concurrency": "N",
                          "--upload-adapter": "MODEL NAME DIR", "--config": "PATH"}.items():
        assert re.match(rf"│ {option}( +-[a-z])? +{label}  ", rows[option]), rows[option]
    lines = [line.strip() for line in out.splitlines()]
    examples = [line.strip() for line in deploy.EXAMPLES.splitlines()
                if line.startswith("  ")]
    assert len(examples) >= 10
    for example in examples:  # each one whole on its own line
        assert example in lines, (example, out)


# ## Never import modal (nor, from a warm cache, pydantic or yaml)


def _imported(args: list[str]) -> tuple[set[str], str]:
    """Top-level modules `python deploy.py ARGS` imports, from -X importtime."""
    proc = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "deploy.py"), *args],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ),
                          check=False,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*([\w.]+)$", proc.stderr, re.MULTILINE)
    assert names, proc.stderr
    return {name.split(".")[0] for name in names}, proc.stdout


@pytest.mark.parametrize("args", [["--list"], ["--all", "--dry-run"], ["--help"]],
                         ids=["list", "dry-run", "help"])
def test_fast_commands_never_import_modal(args):
    _imported(["--list"])  # fills the validated-matrix cache (this test's own directory)
    modules, out = _imported(args)
    assert "modal" not in modules, sorted(modules)
    assert {"pydantic", "yaml", "annotated_types"}.isdisjoint(modules), sorted(modules)
    assert out, "no output"


# ## Plain options are coerced without pydantic (deploy.py's startup-speed shim)


def test_plain_options_keep_typer_semantics():
    import typer

    seen = {}
    app = typer.Typer()

    @app.command()
    def main(name: str = "x", count: int = 1, ratio: float = 0.5, path: Path = Path("a"),
             tag: list[str] | None = None, flag: bool = False, maybe: str | None = None,
             pair: tuple[str, Path] | None = None):
        seen.update(name=name, count=count, ratio=ratio, path=path, tag=tag, flag=flag,
                    maybe=maybe, pair=pair)

    args = ["--name", "n", "--count", "3", "--ratio", "0.25", "--path", "b/c",
            "--tag", "t1", "--tag", "t2", "--flag", "--pair", "p", "d/e"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert seen == {"name": "n", "count": 3, "ratio": 0.25, "path": Path("b/c"),
                    "tag": ["t1", "t2"], "flag": True, "maybe": None, "pair": ("p", Path("d/e"))}
    result = CliRunner().invoke(app, [])
    assert result.exit_code == 0, result.output
    assert seen["tag"] is None and seen["count"] == 1 and seen["path"] == Path("a")
    assert seen["pair"] is None
    result = CliRunner().invoke(app, ["--count", "three"], env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--count': expected a whole number, not 'three'" in result.output


@pytest.mark.parametrize(("args", "message"), [
    (["--list", "--yes"], "Error: --yes goes with --stop, not --list"),
    (["--list", "--ignore-endpoint-limit"],
     "Error: --ignore-endpoint-limit goes with --gpu, --all or --model, not --list"),
    (["--gpu", "h100", "--port", "9000", "--dry-run"], "Error: --port goes with --serve-local, not --gpu"),
    (["--serve-local", "--dry-run"], "Error: --dry-run goes with --gpu, --all, --model or --batch, not --serve-local"),
    (["--status", "--redeploy"], "Error: --redeploy goes with --upload-adapter, not --status"),
])
def test_an_option_given_with_an_action_it_does_not_modify_is_a_usage_error(args, message):
    """Never silently ignored: a user who typed it meant something by it."""
    result = CliRunner().invoke(deploy.cli, args)
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == message


# ## A closed pipe is not an error: `deploy.py ... | head -1` exits 0, quietly


PIPED = [["--all", "--dry-run"], ["--all", "--dry-run", "--json"], ["--list"],
         ["--list", "--json"], ["--help"]]


@pytest.mark.parametrize("args", PIPED, ids=" ".join)
def test_output_into_a_pipe_nobody_reads_exits_0_quietly(args):
    """The pipe's read end is closed before deploy.py starts: its first write fails (EPIPE),
    every time."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "deploy.py"), *args], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120, cwd=ROOT,
                              check=False)
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr) == (0, "")


@pytest.mark.parametrize("args", PIPED[:2], ids=" ".join)
def test_piped_into_head_exits_0(args):
    """As a shell runs `deploy.py ARGS | head -1`: a real reader that stops after a line."""
    deploy_proc = subprocess.Popen([sys.executable, str(ROOT / "deploy.py"), *args],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    head = subprocess.Popen(["head", "-1"], stdin=deploy_proc.stdout, stdout=subprocess.PIPE,
                            text=True)
    deploy_proc.stdout.close()  # head alone reads the pipe now
    first, _ = head.communicate(timeout=120)
    _, errors = deploy_proc.communicate(timeout=120)
    assert first.strip() in ("vllm-l40s (gpu app)", "["), first
    assert (deploy_proc.returncode, errors) == (0, b"")


def test_an_error_into_a_closed_pipe_keeps_its_exit_code():
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "deploy.py"), "--gpu", "tpu",
                               "--dry-run"], stdout=subprocess.PIPE, stderr=write_end,
                              timeout=120, cwd=ROOT, check=False)
    finally:
        os.close(write_end)
    assert proc.returncode == 2
