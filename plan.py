"""What would be deployed: apps, their endpoint, and one GPU pool per model.

Pure data from the matrix, no Modal import: `deploy.py --dry-run` prints it,
the Modal apps are built from it, and deploy preflight checks it. One source
of truth for names of apps, secrets and volumes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import config
import engine

# Modal Secrets the apps read (created by the user, see README).
HF_SECRET = "huggingface"  # HF_TOKEN, for gated models such as Gemma
API_KEY_SECRET = "vllm-api-key"  # API_KEY, the bearer key the gateway checks
SECRET_KEYS = {HF_SECRET: "HF_TOKEN", API_KEY_SECRET: "API_KEY"}

# Modal Volumes, mounted in every GPU pool: weights download once, compile once.
VOLUMES = {
    "/root/.cache/huggingface": "huggingface-cache",
    "/root/.cache/vllm": "vllm-cache",
}
ADAPTERS_VOLUME = "vllm-lora-adapters"  # LoRA adapters, uploaded by deploy.py --upload-adapter
WEB_FUNCTION = "serve"  # the one web endpoint of every app; its name is in the URL
# What a pool tells the router and --status beyond its answers (pool_state.py): its last
# start-up failure and the GPU it runs on, and the marks that stop a stream whose client left.
STATE_DICT = "modal-vllm-state"
CANCEL_QUEUE = "modal-vllm-stream-cancel"

MODAL_MAX_TIMEOUT = 24 * 3600  # seconds: Modal runs no function input longer
ROUTER_TIMEOUT_MARGIN = 60  # seconds the router keeps, past its wait, to answer 504 itself


@dataclass(frozen=True)
class Pool:
    """One model's GPU container pool in an app."""

    fit: config.Fit
    argv: list[str]
    secrets: list[str]
    snapshot: bool

    @property
    def model(self) -> config.Model:
        return self.fit.model

    @property
    def volumes(self) -> dict[str, str]:
        """Mount point -> Volume name; the adapters Volume only where adapters are served."""
        if not self.model.adapters:
            return dict(VOLUMES)
        return {**VOLUMES, engine.ADAPTERS_MOUNT: ADAPTERS_VOLUME}

    @property
    def bill(self) -> config.Bill:
        """One replica's GPUs, CPU and memory reservation, and what they cost per hour."""
        return self.fit.bill(snapshot=self.snapshot)

    @property
    def usd_per_hour(self) -> float:
        """One running replica: GPUs + CPU + memory (Modal bills all three)."""
        return self.bill.usd_per_hour

    def idle_tail_usd(self, defaults: config.Defaults) -> float:
        """What the scaledown window costs after each burst of use: a replica idling."""
        return self.usd_per_hour * defaults.scaledown_window_seconds / 3600


@dataclass(frozen=True)
class App:
    name: str
    kind: str  # "gpu" (one app per GPU type, every model) or "legacy" (one model)
    gpu: config.GPU
    pools: list[Pool]
    skipped: list[config.Fit] = field(default_factory=list)  # models that do not fit

    @property
    def url_pattern(self) -> str:
        return config.endpoint_url_pattern(self.name)

    @property
    def secrets(self) -> list[str]:
        names = [API_KEY_SECRET] + [s for p in self.pools for s in p.secrets]
        return list(dict.fromkeys(names))


@dataclass(frozen=True)
class Timeouts:
    """How long each part may take, nested so that the client hears the gateway's 504, not
    Modal's own timeout.

    A pool's `timeout` counts one request and its `startup_timeout` one cold start, but neither
    counts the time an input waits for a GPU (Modal: "timeouts do not include scheduling").
    The router's clock runs through all of it, so it waits up to startup + request for a pool
    (`router_wait`) and its own function timeout is that plus a margin to answer; both capped
    by Modal's 24 hours.
    """

    startup: int  # a pool's cold start: container start, weights, vLLM load
    request: int  # one request on a pool (and on a legacy app's web function)
    router: int  # the router function's timeout
    router_wait: int  # how long the router waits for a pool before answering 504


def timeouts(defaults: config.Defaults) -> Timeouts:
    startup, request = defaults.startup_timeout_seconds, defaults.request_timeout_seconds
    router = min(startup + request + ROUTER_TIMEOUT_MARGIN, MODAL_MAX_TIMEOUT)
    return Timeouts(startup, request, router, router - ROUTER_TIMEOUT_MARGIN)


def pool_for(fit: config.Fit, defaults: config.Defaults, *, snapshots: bool = True) -> Pool:
    # GPU snapshots restore one GPU's memory; Modal does not snapshot multi-GPU replicas.
    # Legacy apps boot vLLM inside their web function, which has no snapshot hooks.
    snapshot = snapshots and fit.model.snapshot and fit.count == 1
    secrets = [HF_SECRET] if fit.model.gated else []
    return Pool(fit, engine.engine_argv(fit, defaults, sleep_mode=snapshot), secrets, snapshot)


def gpu_app(matrix: config.Matrix, gpu_key: str) -> App:
    gpu = matrix.gpu(gpu_key)
    fits = matrix.fits_on(gpu)
    return App(
        name=config.gpu_app_name(gpu.key),
        kind="gpu",
        gpu=gpu,
        pools=[pool_for(f, matrix.defaults) for f in fits if f.fits],
        skipped=[f for f in fits if not f.fits],
    )


def legacy_app(matrix: config.Matrix, key: str) -> App:
    fit = matrix.parse_legacy_key(key)
    if not fit.fits:
        raise config.UsageError(
            f"{config.legacy_key(fit.model.key, fit.gpu.key)} cannot be deployed: {fit.reason}"
        )
    return App(
        name=config.legacy_app_name(fit.model.key, fit.gpu.key),
        kind="legacy",
        gpu=fit.gpu,
        pools=[pool_for(fit, matrix.defaults, snapshots=False)],
    )


def all_gpu_apps(matrix: config.Matrix) -> list[App]:
    return [gpu_app(matrix, key) for key in matrix.gpus]


def all_legacy_apps(matrix: config.Matrix) -> list[App]:
    return [
        legacy_app(matrix, config.legacy_key(f.model.key, f.gpu.key))
        for f in matrix.legacy_cells()
    ]


def app_for_key(matrix: config.Matrix, key: str) -> App:
    """A GPU key (h100) or a legacy key (gemma-3-12b-l40s) to its app."""
    if key.strip().lower() in matrix.gpus:
        return gpu_app(matrix, key)
    try:
        return legacy_app(matrix, key)
    except config.UsageError as exc:
        if "cannot be deployed" in str(exc):
            raise
        raise config.UsageError(
            f"unknown key '{key}'; expected a GPU key ({', '.join(matrix.gpus)}) "
            f"or a legacy <model>-<gpu> key (e.g. {next(iter(matrix.models))}-"
            f"{next(iter(matrix.gpus))})"
        ) from None
