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
        "Models x GPUs (models.yaml)",
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
    # gemma-3-27b: two L40S ($3.90/h), 324k tokens of KV cache; one GPU elsewhere.
    assert "2× $3.90/h" in out, out
    assert "324k tok" in out, out
    assert "1× $2.50/h" in out, out
    assert "does not fit" not in out, out


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
        "kv_cache_tokens": 324_479, "need_gib": 60.0, "budget_gib": 82.3,
        "usd_per_hour": 3.9, "legacy_app": "vllm-gemma-3-27b-l40s",
    }
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
    assert "does not fit" in out, out
    assert ("huge on l40s: needs 1886.8 GiB at max_model_len 4096, "
            "more than 8 x 48 GB x 0.92 allows") in out, out
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
        ("    cost     $3.90/h per running replica; idle it scales to zero after 15 min "
        "(each idle tail ≈ $0.97)"),
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


def test_dry_run_all_shows_five_apps_and_fifteen_pools():
    out = ok("--all", "--dry-run")
    apps = [line for line in out.splitlines() if line.endswith("(gpu app)")]
    assert apps == [f"vllm-{gpu} (gpu app)" for gpu in GPUS], out
    commands = [line for line in out.splitlines() if line.startswith("    command  vllm serve")]
    assert len(commands) == 15, out
    assert sum("--tensor-parallel-size 2" in c for c in commands) == 2, out
    assert all("--host 127.0.0.1" in c and "--enforce-eager" in c for c in commands), out
    assert "  gemma-3-27b (google/gemma-3-27b-it) on H100" in out, out
    assert "    cost     $6.25/h per running replica" in out, out
    assert "Dry run: 5 app(s), nothing deployed." in out, out


def test_dry_run_one_legacy_app():
    out = ok("--model", "gemma-3-12b-l40s", "--dry-run")
    lines = out.splitlines()
    assert lines[0] == "vllm-gemma-3-12b-l40s (legacy app)", out
    assert ("  endpoint   https://<workspace>--vllm-gemma-3-12b-l40s-serve.modal.run  "
            "(function 'serve', the only one)") in lines, out
    assert f"    command  {GEMMA_12B_ON_L40S}" in lines, out
    assert "    cost     $1.95/h per running replica; idle it scales to zero after 15 min " \
           "(each idle tail ≈ $0.49)" in lines, out


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
            qwen["usd_per_idle_tail"]) == (900, 3.9, 0.97)
    assert app["not_served"] == {}


# ## Usage errors (exit 2), config errors (exit 3)


@pytest.mark.parametrize(("args", "message"), [
    (["--list", "--all"], "Invalid value for action: choose one of --list, --all"),
    (["--gpu", "h100", "--model", "gemma-3-12b-h100", "--dry-run"],
     "Invalid value for action: choose one of --gpu, --model"),
    ([], "Invalid value for action: choose one action: --list, --gpu KEY, --all or"),
    (["--dry-run"], "Invalid value for action: choose one action"),
    (["--list", "--dry-run"], "Error: --dry-run goes with --gpu, --all, --model or --batch"),
    (["--gpu", "a10g", "--dry-run"],
     "Error: unknown GPU 'a10g'; valid GPU keys: l40s, a100, h100, h200, b200"),
    (["--model", "llama-3-h100", "--dry-run"],
     ("Error: unknown model-GPU key 'llama-3-h100'; expected <model>-<gpu> with models "
     "gemma-3-12b, gemma-3-27b, qwen3-vl-30b and GPUs l40s, a100, h100, h200, b200")),
    (["--model", "gemma-3-12b", "--dry-run"], "Error: unknown model-GPU key 'gemma-3-12b'"),
    (["--gpu", "[/red]", "--dry-run"], "Error: unknown GPU '[/red]'; valid GPU keys:"),
    (["--list", "--colour"], "No such option: --colour"),
])
def test_usage_errors_exit_2(args, message):
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output, result.output
    assert "Traceback" not in result.output, result.output


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
        "Exit codes  0 ok, 1 failed, 2 usage error, 3 invalid models.yaml",
        "env var: MODAL_VLLM_CONFIG",
    ]:
        assert fragment in result.output, result.output
    assert CliRunner().invoke(deploy.cli, ["-h"]).exit_code == 0


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
    assert "Invalid value for '--count': 'three' is not a valid int" in result.output


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
