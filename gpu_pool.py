# # A model's GPU container pool on Modal, and how the router calls it
#
# Both Modal apps (vllm_gpu_server.py, one per GPU type; vllm_server.py, one
# per model x GPU) are assembled from the parts here: the container images,
# the cache volumes, the engine's life cycle inside a GPU container. The
# router's side of a pool call is router_backend.py; what a pool reports
# beside its answers (start-up failures, its GPU) is pool_state.py.
#
# Everything is built by functions from a `plan.App`, not by decorators at
# import time, so one process (deploy.py --all) can build all five apps.
# Modal finds the pieces again inside the container because each app module
# rebuilds its own app at import from the key baked into the image
# (GPU_KEY / MODEL_KEY), and registers the classes under the same names.

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import modal

import config
import engine
import gateway
import plan
import pool_state

MINUTES = 60  # seconds
CONTAINER_CONFIG = "/root/models.yaml"  # the matrix, copied into every container
VLLM_URL = f"http://{engine.HOST}:{engine.PORT}"
ROUTER_CONCURRENCY = 1000  # the router only relays bytes; one CPU container holds many requests
PROJECT_MODULES = ("config", "engine", "plan", "gateway", "gpu_pool", "pool_state", "router_backend")
# The router image carries the gateway's own dependencies, at the versions locked here.
GATEWAY_PACKAGES = ("httpx", "pyyaml", "pydantic", "annotated-types")
HEALTH_TIMEOUT = 10  # seconds for sleep / wake calls to the local engine
# Modal answers a web request that has not started its response after 150 s with a 303 to
# a result URL, and the function runs on (https://modal.com/docs/guide/webhook-timeouts).
# Whether the app then sees `http.disconnect` is not documented: modal/_runtime/asgi.py only
# relays what Modal's web server sends. So a disconnect this late is taken for that hand-off
# (the answer is still wanted, at the result URL), and an earlier one for a client that left.
# The margin covers the seconds before a cold router sees the request it is timed from.
WEB_REQUEST_LIMIT = 150  # seconds
HANDOFF_AFTER = WEB_REQUEST_LIMIT - 30  # seconds


def load_matrix() -> config.Matrix:
    """The matrix this container (or this deploy) was built from."""
    return config.load(os.environ.get("MODAL_VLLM_CONFIG") or config.DEFAULT_PATH)


# ## Container images
#
# vLLM is installed from PyPI at the version pinned in models.yaml; Modal
# provides the CUDA driver. The project's modules and the matrix are added
# last, so editing them does not rebuild the heavy layers. Each is mounted once:
# the apps are built with `include_source=False`, so Modal does not add the app
# module a second time on its own (modal/_utils/function_utils.py,
# FunctionInfo.get_entrypoint_mount).


def _pinned(names) -> list[str]:
    return [f"{name}=={importlib.metadata.version(name)}" for name in names]


def _with_project(image: modal.Image, matrix: config.Matrix, env: dict[str, str],
                  modules: tuple[str, ...]) -> modal.Image:
    return (
        image.env({"MODAL_VLLM_CONFIG": CONTAINER_CONFIG, **env})
        .add_local_file(matrix.path, CONTAINER_CONFIG)
        .add_local_python_source(*PROJECT_MODULES, *modules)
    )


def vllm_image(matrix: config.Matrix, env: dict[str, str], modules: tuple[str, ...]) -> modal.Image:
    image = (
        modal.Image.debian_slim(python_version="3.12")
        .uv_pip_install(f"vllm=={matrix.defaults.vllm_version}")
        .env(engine.engine_env())  # HF_XET_HIGH_PERFORMANCE: faster weight downloads
    )
    return _with_project(image, matrix, env, modules)


def router_image(matrix: config.Matrix, env: dict[str, str], modules: tuple[str, ...]) -> modal.Image:
    image = modal.Image.debian_slim(python_version="3.12").uv_pip_install(
        *_pinned(GATEWAY_PACKAGES)
    )
    return _with_project(image, matrix, env, modules)


def volumes(pool: plan.Pool) -> dict[str, modal.Volume]:
    """Weights download once per workspace; compile artifacts are reused; adapters are read."""
    return {at: modal.Volume.from_name(name, create_if_missing=True)
            for at, name in pool.volumes.items()}


def secrets(names: list[str]) -> list[modal.Secret]:
    return [modal.Secret.from_name(name) for name in names]


# ## The engine inside a GPU container
#
# `@modal.enter` starts `vllm serve` on localhost and waits for it under a
# deadline (engine.py); `@modal.exit` stops it. The router reaches it only
# through the two methods below, for the two allowlisted paths. Each answer
# carries the engine's own time and the GPU it ran on (pool_state.py), which
# the router passes on as response headers.

ALLOWED_PATHS = (gateway.CHAT, gateway.COMPLETIONS)


class LocalEngine:
    """The gateway Backend inside a GPU container: HTTP to this container's own vLLM.

    It adds the engine's time (`engine;dur`, to vLLM's first byte for a stream) and the GPU
    header to each answer. A vLLM that dies after it was ready never comes back, so a failed
    call that finds it dead retires the container (Modal starts a fresh one) instead of
    answering 502 until the scaledown window runs out.
    """

    def __init__(self, vllm: engine.Engine, model_key: str, url: str = VLLM_URL,
                 gpu_header: bytes = b""):
        self.engine = vllm
        self.http = gateway.HTTPBackend({model_key: url})
        self.gpu_header = gpu_header  # set once the GPU facts are known
        self.retired = False

    def _facts(self, started: float) -> list[tuple[bytes, bytes]]:
        facts = [pool_state.server_timing("engine", started)]
        return facts + [(pool_state.GPU_HEADER, self.gpu_header)] if self.gpu_header else facts

    async def send(self, model: config.Model, path: str, body: bytes,
                   headers: list | None = None) -> tuple[int, bytes]:
        started = time.perf_counter()
        try:
            status, raw = await self.http.send(model, path, body)
        except gateway.BackendError:
            await self.retire_if_dead()
            raise
        if headers is not None:
            headers += self._facts(started)
        return status, raw

    async def stream(self, model: config.Model, path: str, body: bytes,
                     headers: list | None = None) -> AsyncIterator[bytes]:
        started = time.perf_counter()
        first = True
        try:
            async for chunk in self.http.stream(model, path, body):
                if first and headers is not None:
                    headers += self._facts(started)
                first = False
                yield chunk
        except gateway.BackendError:
            await self.retire_if_dead()
            raise

    async def retire_if_dead(self) -> None:
        if self.retired or self.engine.running():
            return
        self.retired = True  # once, though many concurrent inputs fail together
        print("vLLM exited; this container stops taking requests. Last log lines:\n"
              + self.engine.log_tail())
        await modal.experimental.stop_fetching_inputs.aio()

    async def aclose(self) -> None:
        await self.http.aclose()


class EngineMethods:
    """What every model's pool answers. Subclassed per model with `app_name`, `model_key` and
    `gpu_key` set.

    The `@modal.enter` hooks live in the two subclasses, not here: Modal collects
    lifecycle methods from every class in the MRO by name, so a subclass cannot
    drop an inherited `@modal.enter()` by overriding it with `snap=True`.
    """

    app_name = ""
    model_key = ""
    gpu_key = ""

    def _boot(self, *, sleep_mode: bool) -> None:
        matrix = load_matrix()
        fit = matrix.fit(matrix.models[self.model_key], matrix.gpu(self.gpu_key))
        self.model = fit.model
        self.engine = engine.Engine(
            engine.engine_argv(fit, matrix.defaults, sleep_mode=sleep_mode),
            env=engine.engine_env(sleep_mode),
        )
        self.engine.start()
        # Fail with vLLM's own log tail a minute before Modal's startup timeout would.
        waited = self.engine.wait_ready(max(60, matrix.defaults.startup_timeout_seconds - MINUTES))
        print(f"vLLM ready for {self.model.name} after {waited:.0f} s")
        # Opens no connection yet (the session is made on the first call), so it is
        # safe to hold in a memory snapshot.
        self.backend = LocalEngine(self.engine, self.model_key)

    @contextlib.contextmanager
    def _reporting(self, *, ready: bool = True):
        """Record a start-up failure where the router sees it, then fail as before (Modal
        restarts the container); on success (`ready`), record the GPU and clear the failure."""
        records = pool_state.Records()
        try:
            yield
        except Exception as exc:
            records.report_failure(self.app_name, self.model_key, exc)
            raise
        if ready:
            facts = pool_state.gpu_facts()
            self.backend.gpu_header = pool_state.facts_header(facts)
            records.report_ready(self.app_name, self.model_key, facts)

    @modal.method()
    async def request(self, path: str, body: bytes) -> tuple[int, bytes, list]:
        """The engine's status and JSON body, both as the gateway forwards them, and the
        response headers the pool adds (timing, GPU)."""
        headers: list[tuple[bytes, bytes]] = []
        if path not in ALLOWED_PATHS:  # the router never asks for more; refuse anyway
            return 404, gateway.error_body(404, "not found"), headers
        try:
            status, raw = await self.backend.send(self.model, path, body, headers)
        except gateway.BackendError as exc:
            return exc.status, gateway.error_body(exc.status, exc.message), headers
        return status, raw, headers

    @modal.method()
    async def stream(self, path: str, body: bytes, stream_id: str = ""):
        """Yields (status, headers) first, then SSE bytes (200) or one error body (otherwise).

        Stops when the router marks `stream_id` cancelled (its client left): the input's
        task is cancelled, which closes the connection to vLLM, which aborts the generation.
        """
        if path not in ALLOWED_PATHS:
            yield 404, []
            yield gateway.error_body(404, "not found")
            return
        watcher = None
        if stream_id:
            if not hasattr(self, "cancel_marks"):
                self.cancel_marks = pool_state.CancelMarks()
            watcher = self.cancel_marks.watch(stream_id, asyncio.current_task())
        headers: list[tuple[bytes, bytes]] = []
        started = False
        try:
            async for chunk in self.backend.stream(self.model, path, body, headers):
                if not started:
                    started = True
                    yield 200, headers
                yield chunk
        except gateway.BackendError as exc:
            if started:  # the router turns this into an SSE error event
                raise RuntimeError(exc.message) from None
            yield exc.status, headers
            yield gateway.error_body(exc.status, exc.message)
        finally:
            if watcher is not None:
                watcher.cancel()

    @modal.exit()
    def stop(self) -> None:
        self.engine.stop()


class EnginePool(EngineMethods):
    """A cold start boots vLLM from the weights on the Volume."""

    @modal.enter()
    def start(self) -> None:
        with self._reporting():
            self._boot(sleep_mode=False)


class SnapshotEnginePool(EngineMethods):
    """GPU memory snapshot: boot once, put vLLM to sleep, snapshot; later cold starts restore.

    Sleep mode's /sleep and /wake_up listen on localhost only and the gateway
    never forwards them (its routes are an allowlist). The GPU is recorded after the
    restore, not before the snapshot: a restored container may run on another machine.
    """

    @modal.enter(snap=True)
    def boot_and_sleep(self) -> None:
        import httpx

        with self._reporting(ready=False):
            self._boot(sleep_mode=True)
            # A failed sleep must not be snapshotted as if it had worked.
            httpx.post(f"{VLLM_URL}/sleep", params={"level": 1},
                       timeout=HEALTH_TIMEOUT * 6).raise_for_status()

    @modal.enter(snap=False)
    def wake(self) -> None:
        import httpx

        with self._reporting():
            httpx.post(f"{VLLM_URL}/wake_up", timeout=HEALTH_TIMEOUT * 6).raise_for_status()


def pool_class_name(model_key: str) -> str:
    return "Pool_" + "".join(c if c.isalnum() else "_" for c in model_key)


def pool_class(pool: plan.Pool, app_plan: plan.App, module: str) -> type:
    """A fresh subclass for one model, named so the container's re-import finds it."""
    base = SnapshotEnginePool if pool.snapshot else EnginePool
    name = pool_class_name(pool.model.key)
    return type(name, (base,), {"__module__": module, "__qualname__": name,
                                "app_name": app_plan.name, "model_key": pool.model.key,
                                "gpu_key": app_plan.gpu.key})


def gpu_class_options(pool: plan.Pool, defaults: config.Defaults, image: modal.Image) -> dict:
    """The `app.cls` arguments of one model's GPU pool, each answering one question."""
    options = {
        "image": image,
        "gpu": pool.fit.gpu_string,  # which GPUs, and how many (the fit check decides)
        # CPU cores and memory (MiB) for vLLM's processes (config.pool_reservation says
        # why): Modal bills max(reservation, use) and guarantees only the reservation.
        "cpu": pool.bill.cpu_cores,
        "memory": pool.bill.memory_mib,
        "volumes": volumes(pool),  # where weights, compile caches and adapters persist
        "secrets": secrets(pool.secrets),  # HF_TOKEN for gated models
        "scaledown_window": defaults.scaledown_window_seconds,  # idle how long before stopping?
        "max_containers": defaults.max_replicas,  # how many replicas at most (a cost guard)?
        "startup_timeout": defaults.startup_timeout_seconds,  # how long may a cold start take?
        "timeout": defaults.request_timeout_seconds,  # how long may one request run?
    }
    if pool.snapshot:
        options.update(enable_memory_snapshot=True,
                       experimental_options={"enable_gpu_snapshot": True})
    return options


# ## What each app module builds: kept here, not read back from Modal
#
# Modal 1.7 removes `App.registered_functions`; this record is what tests
# and deploy.py inspect instead.


@dataclass
class Built:
    app: modal.App
    plan: plan.App
    web: modal.Function  # the one web endpoint: the router, or the legacy gateway+engine
    pools: dict[str, modal.Cls]  # model key -> its GPU pool
    image_packages: list[str]  # what pip installs in the GPU image
    entrypoint: Callable | None = None


def served_model(app_plan: plan.App, name: str) -> config.Model:
    for pool in app_plan.pools:
        if name.strip().lower() in (alias.lower() for alias in pool.model.aliases):
            return pool.model
    served = ", ".join(p.model.key for p in app_plan.pools)
    raise config.UsageError(f"'{name}' is not served by {app_plan.name}; it serves {served}")


def check_endpoint(built: Built, model: str, api_key: str, timeout: float) -> None:
    """`modal run`'s smoke test: /health, then one short chat completion per model."""
    import httpx

    key = api_key or os.environ.get("VLLM_API_KEY", "")
    models = [served_model(built.plan, model)] if model else [p.model for p in built.plan.pools]
    failed = False
    with httpx.Client(base_url=built.web.get_web_url(), timeout=timeout,
                      follow_redirects=True) as client:  # Modal answers slow requests with 303
        health = client.get("/health")
        print(f"GET /health -> {health.status_code}")
        failed |= health.status_code != 200
        for m in models:
            reply = client.post(
                "/v1/chat/completions",
                headers={"Authorization": f"Bearer {key}"},
                json={"model": m.name, "max_tokens": 16,
                      "messages": [{"role": "user", "content": "Say hello."}]},
            )
            ok = reply.status_code == 200
            text = reply.json()["choices"][0]["message"]["content"] if ok else reply.text[:200]
            print(f"{m.key}: {reply.status_code} {text!r}")
            failed |= not ok
    if failed:
        raise SystemExit(1)


def app_or_exit(build_from_env: Callable[[], Built]) -> modal.App:
    """For `modal deploy` and the container: a bad key is one line on stderr, not a traceback."""
    try:
        return build_from_env().app
    except config.UserError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None


def container_key(variable: str, valid: list[str]) -> str:
    """The key baked into the image (or given to `modal deploy`), checked."""
    value = os.environ.get(variable, "").strip()
    if not value:
        raise config.UsageError(f"{variable} is not set; valid keys: {', '.join(valid)} "
                                f"(e.g. {variable}={valid[0]} uv run modal deploy ...)")
    return value
