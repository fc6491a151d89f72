"""Exports for other tools: a LiteLLM proxy config from the matrix, and endpoint lines for evals.

Pure functions over a validated `config.Matrix`: no network, no Modal. `deploy.py
--litellm-config` writes `litellm_config_text(...)`; `deploy.py --url KEY --format`
prints `endpoint_text(...)` for the URL that cloud.py looked up.

How LiteLLM 1.108.7 reads the config (proxy_server.ProxyConfig): a value that is
exactly `os.environ/NAME` is replaced by that variable, nothing else is
interpolated (`https://${MODAL_WORKSPACE}--...` would stay literal). So each GPU
endpoint is one whole variable, `VLLM_<GPU>_API_BASE`, which docker-compose.yml
builds from MODAL_WORKSPACE; or, with a workspace given, the URLs are written out.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import config

DEFAULT_LITELLM_CONFIG = Path(__file__).with_name("litellm_config.yaml")
COMPOSE_FILE = Path(__file__).with_name("docker-compose.yml")
API_KEY_ENV = "VLLM_API_KEY"  # the gateway's bearer key; LiteLLM reads it, the file never holds it
MASTER_KEY_ENV = "LITELLM_MASTER_KEY"  # what clients of the proxy send; LiteLLM refuses to start without
WORKSPACE_ENV = "MODAL_WORKSPACE"
PROVIDER = "openai"  # LiteLLM's OpenAI-compatible client: passes vLLM fields (structured_outputs) through
FORMATS = ("url", "env", "json")


# ## Names and URLs


def api_base_env(gpu_key: str) -> str:
    """The variable holding one GPU app's API base (h100 -> VLLM_H100_API_BASE)."""
    return f"VLLM_{re.sub(r'[^A-Z0-9]', '_', gpu_key.upper())}_API_BASE"


def gateway_url(workspace: str, gpu_key: str) -> str:
    """A GPU app's endpoint in a Modal workspace (for an environment other than the default
    one, Modal's URLs read `<workspace>-<environment>`: pass that as the workspace)."""
    return config.endpoint_url_pattern(config.gpu_app_name(gpu_key)).replace(
        "<workspace>", workspace)


def check_workspace(workspace: str) -> str:
    name = workspace.strip().lower()
    if not re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?", name):
        raise config.UsageError(
            f"--workspace '{workspace}': expected a Modal workspace name (letters, digits, '-'), "
            "as in https://<workspace>--vllm-h100-serve.modal.run")
    return name


def _env_names(matrix: config.Matrix) -> dict[str, str]:
    names: dict[str, str] = {}
    for gpu_key in matrix.gpus:
        env = api_base_env(gpu_key)
        if env in names.values():
            other = next(k for k, v in names.items() if v == env)
            raise config.UsageError(f"GPU keys '{other}' and '{gpu_key}' both map to the "
                                    f"variable {env}; rename one of them in {matrix.path.name}")
        names[gpu_key] = env
    return names


# ## The LiteLLM proxy config


def litellm_config(matrix: config.Matrix, *, workspace: str | None = None) -> dict:
    """LiteLLM's `model_list` for every model x GPU that fits, plus routing by model name.

    `<model>-<gpu>` (e.g. gemma-3-12b-h100) goes to that GPU's endpoint. `<model>` alone
    (e.g. gemma-3-12b) is a group of one deployment per GPU serving it, each with
    LiteLLM's `order`: the cheapest $/hour per replica first (its GPUs plus the CPU and
    memory it reserves: `config.Fit.usd_per_hour`, what Modal bills), equal prices (to the
    cent) load-balanced, and on failure LiteLLM falls back to the next order. The key is
    `os.environ/...`.
    """
    envs = _env_names(matrix)
    site = check_workspace(workspace) if workspace else None

    def params(fit: config.Fit) -> dict:
        return {
            "model": f"{PROVIDER}/{fit.model.name}",
            "api_base": (f"{gateway_url(site, fit.gpu.key)}/v1" if site
                         else f"os.environ/{envs[fit.gpu.key]}"),
            "api_key": f"os.environ/{API_KEY_ENV}",
        }

    model_list = []
    for model in matrix.models.values():
        fits = [f for f in (matrix.fit(model, g) for g in matrix.gpus.values()) if f.fits]
        for fit in fits:
            model_list.append({"model_name": config.legacy_key(model.key, fit.gpu.key),
                               "litellm_params": params(fit)})
        prices = sorted({round(f.usd_per_hour, 2) for f in fits})
        for fit in sorted(fits, key=lambda f: f.usd_per_hour):
            order = prices.index(round(fit.usd_per_hour, 2)) + 1
            model_list.append({"model_name": model.key,
                               "litellm_params": {**params(fit), "order": order}})
    return {
        "model_list": model_list,
        "general_settings": {"master_key": f"os.environ/{MASTER_KEY_ENV}"},
    }


def required_env(matrix: config.Matrix, *, workspace: str | None = None) -> list[str]:
    """The variables LiteLLM must have for this config, in the order a .env would list them."""
    bases = [] if workspace else list(_env_names(matrix).values())
    return [*bases, API_KEY_ENV, MASTER_KEY_ENV]


def litellm_config_text(matrix: config.Matrix, *, workspace: str | None = None) -> str:
    """The config as a commented YAML file (what --litellm-config writes)."""
    import yaml

    data = litellm_config(matrix, workspace=workspace)
    if workspace:
        where = f"the endpoints of Modal workspace '{check_workspace(workspace)}'"
    else:
        where = (f"each GPU's endpoint from VLLM_<GPU>_API_BASE (docker-compose.yml sets them "
                 f"from {WORKSPACE_ENV})")
    header = [
        f"# LiteLLM proxy config generated from {matrix.path.name}: do not edit, regenerate it",
        "# with `uv run deploy.py --litellm-config` (tests check the two never drift).",
        "# <model>-<gpu> is one GPU app; <model> alone routes to the cheapest GPU serving it",
        "# ($/hour per replica: GPUs + CPU + memory; LiteLLM's `order`) and falls back to the",
        "# next on failure.",
        f"# Reads {where},",
        f"# the gateway key from {API_KEY_ENV}, and the proxy's own key from {MASTER_KEY_ENV}.",
    ]
    body = yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=100)
    return "\n".join(header) + "\n\n" + body


def compose_missing_env(matrix: config.Matrix, compose_path: Path = COMPOSE_FILE) -> list[str]:
    """API-base variables the config reads that docker-compose.yml does not set (a new GPU)."""
    import yaml

    try:
        compose = yaml.safe_load(compose_path.read_text(encoding="utf-8")) or {}
        services = compose.get("services") or {}
        defined = {name for svc in services.values()
                   for name in ((svc or {}).get("environment") or {})}
    except (OSError, yaml.YAMLError, AttributeError, TypeError):
        return []  # no compose file of ours here: nothing to compare with
    return [env for env in _env_names(matrix).values() if env not in defined]


# ## Endpoint lines for eval harnesses (--url KEY --format)


def endpoint_text(url: str, fmt: str, *, api_key: str | None = None) -> str:
    """The deployed URL as a bare URL, `.env` lines, or JSON; the key only if given."""
    base = url.rstrip("/")
    if api_key and any(c.isspace() for c in api_key):
        raise config.UsageError(f"{API_KEY_ENV} contains whitespace; it cannot go in a .env line")
    if fmt == "url":
        return base + "\n"
    if fmt == "env":
        return f"LLM_BASE_URL={base}/v1\nLLM_API_KEY={api_key or ''}\n"
    if fmt == "json":
        return json.dumps({"url": base, "base_url": f"{base}/v1", "api_key": api_key},
                          indent=2) + "\n"
    raise config.UsageError(f"--format '{fmt}': choose one of {', '.join(FORMATS)}")
