"""exports.py and its flags: the LiteLLM config as data, the committed files that must match it
(litellm_config.yaml, docker-compose.yml, litellm-proxy/), and `--url KEY --format`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import cloud
import config
import deploy
import exports

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-exports-test-0123456789"
H100_URL = "https://acme--vllm-h100-serve.modal.run"


def run(*args: str, env: dict | None = None):
    return CliRunner().invoke(deploy.cli, list(args), env={"COLUMNS": "200", **(env or {})})


def entries(data: dict, name: str) -> list[dict]:
    return [e["litellm_params"] for e in data["model_list"] if e["model_name"] == name]


# ## The LiteLLM config as data


def test_one_entry_per_model_and_gpu_routed_to_that_gpu_app(matrix):
    data = exports.litellm_config(matrix)
    assert entries(data, "gemma-3-12b-h100") == [{
        "model": "openai/google/gemma-3-12b-it",
        "api_base": "os.environ/VLLM_H100_API_BASE",
        "api_key": "os.environ/VLLM_API_KEY"}]
    assert entries(data, "qwen3-vl-30b-l40s") == [{
        "model": "openai/Qwen/Qwen3-VL-30B-A3B-Instruct",
        "api_base": "os.environ/VLLM_L40S_API_BASE",
        "api_key": "os.environ/VLLM_API_KEY"}]
    per_gpu = [e["model_name"] for e in data["model_list"] if "order" not in e["litellm_params"]]
    assert per_gpu == [f"{m}-{g}" for m in matrix.models for g in matrix.gpus]  # all 15 fit
    assert data["general_settings"] == {"master_key": "os.environ/LITELLM_MASTER_KEY"}


# $/hour per replica, GPUs + CPU + memory (config.Fit.bill; worked out in test_config.py):
# one GPU adds 4 cores x $0.04716 + 14 GiB x $0.007992 = $0.300528, two GPUs add 5 cores +
# 20 GiB = $0.39564. So 2 x L40S ($3.90 + 0.40 = $4.30) is now dearer than one H100
# ($3.95 + 0.30 = $4.25): the CPU and memory a second GPU's worker reserves tip it.
@pytest.mark.parametrize(("model", "gpus_cheapest_first"), [
    ("gemma-3-12b", ["l40s", "a100", "h100", "h200", "b200"]),  # 2.25 2.80 4.25 4.84 6.55
    ("gemma-3-27b", ["a100", "h100", "l40s", "h200", "b200"]),  # 2.80 4.25 4.30 4.84 6.55
])
def test_model_name_alone_routes_cheapest_replica_first(matrix, model, gpus_cheapest_first):
    group = entries(exports.litellm_config(matrix), model)
    assert [p["api_base"] for p in group] == [
        f"os.environ/{exports.api_base_env(g)}" for g in gpus_cheapest_first]
    assert [p["order"] for p in group] == [1, 2, 3, 4, 5]
    assert {p["model"] for p in group} == {f"openai/{matrix.models[model].name}"}


def test_equal_prices_share_an_order_and_cells_that_do_not_fit_are_left_out(tmp_path):
    text = (ROOT / "models.yaml").read_text()
    text = text.replace("a100: {modal_gpu: A100-80GB, vram_gb: 80, usd_per_hour: 2.50}",
                        "a100: {modal_gpu: A100-80GB, vram_gb: 80, usd_per_hour: 3.95}")
    text = text.replace("  l40s: {modal_gpu: L40S, vram_gb: 48, usd_per_hour: 1.95}",
                        "  l40s: {modal_gpu: L40S, vram_gb: 48, usd_per_hour: 1.95, max_count: 1}")
    path = tmp_path / "models.yaml"
    path.write_text(text)
    data = exports.litellm_config(config.load(path))
    group = entries(data, "gemma-3-27b")  # does not fit one L40S, the only count allowed now
    assert [(p["api_base"].split("/")[1], p["order"]) for p in group] == [
        ("VLLM_A100_API_BASE", 1), ("VLLM_H100_API_BASE", 1),  # both $3.95: load-balanced
        ("VLLM_H200_API_BASE", 2), ("VLLM_B200_API_BASE", 3)]
    assert not entries(data, "gemma-3-27b-l40s")


def test_workspace_writes_literal_urls_and_still_no_key(matrix):
    data = exports.litellm_config(matrix, workspace="Acme-Labs")
    assert entries(data, "gemma-3-12b-b200")[0]["api_base"] == (
        "https://acme-labs--vllm-b200-serve.modal.run/v1")
    assert exports.required_env(matrix, workspace="acme") == ["VLLM_API_KEY", "LITELLM_MASTER_KEY"]
    for bad in [" ", "acme labs", "acme/x", "-acme", "acme.dev"]:
        with pytest.raises(config.UsageError, match="workspace"):
            exports.litellm_config(matrix, workspace=bad)


def test_gpu_keys_become_distinct_variable_names(matrix, tmp_path):
    assert exports.api_base_env("a100") == "VLLM_A100_API_BASE"
    assert exports.api_base_env("h100.x-2") == "VLLM_H100_X_2_API_BASE"
    text = (ROOT / "models.yaml").read_text().replace(
        "  b200: {", "  h200-x: {modal_gpu: H200, vram_gb: 141, usd_per_hour: 4.54}\n"
                     "  h200.x: {modal_gpu: H200, vram_gb: 141, usd_per_hour: 4.54}\n  b200: {")
    (tmp_path / "models.yaml").write_text(text)
    with pytest.raises(config.UsageError, match="'h200-x' and 'h200.x' both map to"):
        exports.litellm_config(config.load(tmp_path / "models.yaml"))


# ## The committed files never drift from the matrix


def test_committed_litellm_config_is_what_the_command_generates(matrix):
    committed = (ROOT / "litellm_config.yaml").read_text()
    assert committed == exports.litellm_config_text(matrix), (
        "litellm_config.yaml is stale: run `uv run deploy.py --litellm-config`")
    assert yaml.safe_load(committed) == exports.litellm_config(matrix)


def compose_service() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["litellm"]


def interpolate(value: str, env: dict) -> str:
    """docker compose's ${NAME}, ${NAME:?message} and ${NAME:-default}, enough for our file."""
    return re.sub(r"\$\{(\w+)(?::[?-][^}]*)?\}", lambda m: env[m[1]], value)


def test_compose_sets_every_endpoint_the_config_reads(matrix):
    environment = compose_service()["environment"]
    for gpu in matrix.gpus:
        value = interpolate(environment[exports.api_base_env(gpu)], {"MODAL_WORKSPACE": "acme"})
        assert value == f"{exports.gateway_url('acme', gpu)}/v1"
    assert exports.compose_missing_env(matrix) == []
    for name in ("VLLM_API_KEY", "LITELLM_MASTER_KEY"):
        assert environment[name].startswith(f"${{{name}:?"), name  # required, fails at `up`
    # A deployment without an api_base must never fall back to api.openai.com.
    for name in ("OPENAI_BASE_URL", "OPENAI_API_BASE"):
        assert ".invalid/" in environment[name]


def test_compose_runs_the_pinned_litellm_on_loopback_port_4000_with_the_config():
    service = compose_service()
    locked = tomllib.loads((ROOT / "litellm-proxy" / "pyproject.toml").read_text())
    pin = next(d for d in locked["project"]["dependencies"] if d.startswith("litellm["))
    version = pin.split("==")[1]
    assert service["image"] == f"ghcr.io/berriai/litellm:main-v{version}"
    assert service["ports"] == ["127.0.0.1:4000:4000"]
    assert "./litellm_config.yaml:/app/config.yaml:ro" in service["volumes"]
    assert service["command"][:2] == ["--config", "/app/config.yaml"]
    assert service["env_file"] == ".env"
    lock = (ROOT / "litellm-proxy" / "uv.lock").read_text()
    assert f'name = "litellm"\nversion = "{version}"' in lock


def test_env_example_names_what_compose_needs():
    lines = (ROOT / ".env.example").read_text().splitlines()
    names = [line.split("=")[0] for line in lines if line and not line.startswith("#")]
    assert names == ["MODAL_WORKSPACE", "VLLM_API_KEY", "LITELLM_MASTER_KEY"]


def test_compose_reports_a_gpu_it_does_not_set(matrix, tmp_path):
    compose = tmp_path / "docker-compose.yml"
    compose.write_text("services:\n  litellm:\n    environment:\n"
                       "      VLLM_H100_API_BASE: x\n      VLLM_A100_API_BASE: x\n")
    assert exports.compose_missing_env(matrix, compose) == [
        "VLLM_L40S_API_BASE", "VLLM_H200_API_BASE", "VLLM_B200_API_BASE"]
    assert exports.compose_missing_env(matrix, tmp_path / "none.yml") == []


# ## deploy.py --litellm-config


def test_litellm_config_writes_the_file_and_says_where(matrix, tmp_path):
    out = tmp_path / "proxy.yaml"
    result = run("--litellm-config", "--output", str(out))
    assert result.exit_code == 0, result.output
    assert out.read_text() == exports.litellm_config_text(matrix)
    assert f"Wrote {out}: 18 model names" in result.output
    assert "It reads VLLM_L40S_API_BASE, VLLM_A100_API_BASE, VLLM_H100_API_BASE, " \
           "VLLM_H200_API_BASE, VLLM_B200_API_BASE, VLLM_API_KEY, LITELLM_MASTER_KEY" in result.output


def test_litellm_config_to_stdout_with_a_workspace_never_holds_a_key(matrix):
    result = run("--litellm-config", "-o", "-", "--workspace", "acme",
                 env={"VLLM_API_KEY": KEY, "LITELLM_MASTER_KEY": "sk-master"})
    assert result.exit_code == 0, result.output
    assert result.stdout == exports.litellm_config_text(matrix, workspace="acme")
    assert "https://acme--vllm-l40s-serve.modal.run/v1" in result.stdout
    assert KEY not in result.stdout and "sk-master" not in result.stdout


def test_litellm_config_defaults_to_the_file_compose_mounts(monkeypatch, tmp_path):
    target = tmp_path / "litellm_config.yaml"
    monkeypatch.setattr(exports, "DEFAULT_LITELLM_CONFIG", target)
    assert run("--litellm-config").exit_code == 0
    assert target.read_text().startswith("# LiteLLM proxy config generated from models.yaml")


@pytest.mark.parametrize(("args", "message"), [
    (["--litellm-config", "--gpu", "h100"], "choose one of --gpu, --litellm-config"),
    (["--list", "--output", "x.yaml"],
     "--output goes with --litellm-config, --batch or --report, not --list"),
    (["--list", "--workspace", "acme"], "--workspace goes with --litellm-config, not --list"),
    (["--litellm-config", "--json"], ("--json goes with --list, --gpu, --all, --model, --url, "
                                      "--status, --test-gpu, --test, --warm, --bench or --batch")),
    (["--litellm-config", "--workspace", "a b", "-o", "-"], "--workspace 'a b'"),
    (["--litellm-config", "-o", "/nonexistent-dir/x.yaml"], "cannot write"),
])
def test_litellm_config_usage_errors(args, message):
    result = run(*args)
    assert result.exit_code in (1, 2), result.output
    assert message in result.output


def test_litellm_config_stays_modal_free():
    code = ("import sys, runpy; sys.argv = ['deploy.py', '--litellm-config', '-o', '-']\n"
            "try: runpy.run_path('deploy.py', run_name='__main__')\n"
            "except SystemExit: pass\n"
            "assert 'modal' not in sys.modules and 'litellm' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("# LiteLLM proxy config")


# ## --url KEY --format url|env|json [--with-key]


@pytest.mark.parametrize(("fmt", "key", "expected"), [
    ("url", None, f"{H100_URL}\n"),
    ("env", None, f"LLM_BASE_URL={H100_URL}/v1\nLLM_API_KEY=\n"),
    ("env", KEY, f"LLM_BASE_URL={H100_URL}/v1\nLLM_API_KEY={KEY}\n"),
])
def test_endpoint_text(fmt, key, expected):
    assert exports.endpoint_text(H100_URL + "/", fmt, api_key=key) == expected


def test_endpoint_json():
    assert json.loads(exports.endpoint_text(H100_URL, "json")) == {
        "url": H100_URL, "base_url": f"{H100_URL}/v1", "api_key": None}
    with pytest.raises(config.UsageError, match="whitespace"):
        exports.endpoint_text(H100_URL, "env", api_key="sk-a\nLLM_BASE_URL=evil")


@pytest.fixture
def deployed(monkeypatch):
    """cloud.endpoint_url patched at its boundary: the calls it got."""
    calls = []

    def endpoint_url(matrix, key, *, environment=None):
        calls.append((key, environment))
        return H100_URL

    monkeypatch.setattr(cloud, "endpoint_url", endpoint_url)
    return calls


@pytest.mark.parametrize(("args", "env", "stdout"), [
    (["--format", "env"], {}, f"LLM_BASE_URL={H100_URL}/v1\nLLM_API_KEY=\n"),
    (["--format", "ENV", "--with-key"], {"VLLM_API_KEY": KEY},
     f"LLM_BASE_URL={H100_URL}/v1\nLLM_API_KEY={KEY}\n"),
    (["--format", "url"], {"VLLM_API_KEY": KEY}, f"{H100_URL}\n"),
])
def test_url_formats(deployed, args, env, stdout):
    result = run("--url", "h100", *args, env=env)
    assert result.exit_code == 0, result.output
    assert result.stdout == stdout
    assert deployed == [("h100", None)]


def test_url_json_with_key_and_environment(deployed):
    result = run("--url", "gemma-3-12b-l40s", "--format", "json", "--with-key", "--env", "dev",
                 env={"VLLM_API_KEY": KEY})
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["api_key"] == KEY
    assert deployed == [("gemma-3-12b-l40s", "dev")]
    plain = run("--url", "h100", "--json")  # --json alone means --format json
    assert json.loads(plain.stdout) == {"url": H100_URL, "base_url": f"{H100_URL}/v1",
                                        "api_key": None}


@pytest.mark.parametrize(("args", "env", "message"), [
    (["--url", "h100", "--format", "yaml"], {}, "--format 'yaml': choose one of url, env, json"),
    (["--url", "h100", "--format", "env", "--with-key"], {},
     "--with-key reads VLLM_API_KEY, which is not set (in the environment or ./.env)"),
    (["--url", "h100", "--with-key"], {"VLLM_API_KEY": KEY}, "--with-key goes with --format env"),
    (["--url", "h100", "--format", "env", "--json"], {}, "--json and --format env disagree"),
    (["--list", "--format", "env"], {}, "--format goes with --url, not --list"),
    (["--status", "--with-key"], {}, "--with-key goes with --url, not --status"),
])
def test_url_format_usage_errors_are_caught_before_modal(deployed, args, env, message):
    result = run(*args, env=env)
    assert result.exit_code == 2, result.output
    assert f"Error: {message}" in result.output
    assert deployed == []  # offline checks come first


def test_url_format_passes_cloud_errors_through(monkeypatch):
    def not_deployed(matrix, key, *, environment=None):
        raise cloud.NotDeployedError("vllm-h100 is not deployed; deploy it: --gpu h100")

    monkeypatch.setattr(cloud, "endpoint_url", not_deployed)
    result = run("--url", "h100", "--format", "env", env={"VLLM_API_KEY": KEY})
    assert result.exit_code == 1
    assert "Error: vllm-h100 is not deployed" in result.output and result.stdout == ""
