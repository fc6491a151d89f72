"""The Modal apps, built offline with no token (HOME is an empty directory, see conftest).

What each module builds is read from its own record (`gpu_pool.Built`) and
from Modal's `Function.info()`, never from `App.registered_functions`, which
Modal removes in 1.7.
"""

import asyncio
import json
import os
import subprocess
import sys
import textwrap

import httpx
import modal
import pytest
from modal._partial_function import _find_partial_methods_for_user_cls
from modal._partial_function import _PartialFunctionFlags as Flags

import config
import engine
import gateway
import gpu_pool
import plan
import vllm_gpu_server
import vllm_server
from gateway import BackendError

MATRIX = config.load()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOLUMES = {"/root/.cache/huggingface": "huggingface-cache", "/root/.cache/vllm": "vllm-cache"}


def info(cls):
    return cls._get_class_service_function().info()


def secret_names(function_info) -> list[str]:
    return [s.removeprefix("modal.Secret.from_name('").removesuffix("')")
            for s in function_info.secrets]


@pytest.mark.parametrize("gpu", ["l40s", "a100", "h100", "h200", "b200"])
def test_every_gpu_app_builds_with_one_pool_per_model(gpu):
    built = vllm_gpu_server.build(MATRIX, gpu)
    assert built.app.name == f"vllm-{gpu}"
    assert sorted(built.pools) == ["gemma-3-12b", "gemma-3-27b", "qwen3-vl-30b"]
    modal_gpu = MATRIX.gpus[gpu].modal_gpu
    for model, cls in built.pools.items():
        count = 2 if gpu == "l40s" and model != "gemma-3-12b" else 1
        pool_info = info(cls)
        assert pool_info.gpus == [(modal_gpu, count)]
        assert pool_info.web_info is None  # pools are reachable only through the router
        assert pool_info.concurrency_info.max_inputs == MATRIX.defaults.max_concurrent_inputs
        assert pool_info.startup_timeout == MATRIX.defaults.startup_timeout_seconds
        assert pool_info.timeout == MATRIX.defaults.request_timeout_seconds
        assert {at: v.name for at, v in pool_info.volumes.items()} == VOLUMES
        gated = MATRIX.models[model].gated
        assert secret_names(pool_info) == (["huggingface"] if gated else [])
    assert built.image_packages == ["vllm==0.33.0"]


@pytest.mark.parametrize("gpu", ["l40s", "h100"])
def test_the_router_is_the_only_web_endpoint(gpu):
    built = vllm_gpu_server.build(MATRIX, gpu)
    router = built.web.info()
    assert router.web_info is not None
    assert router.gpus == []  # a CPU container: relaying costs no GPU time
    assert router.concurrency_info.max_inputs == gpu_pool.ROUTER_CONCURRENCY
    assert secret_names(router) == ["vllm-api-key"]
    assert not built.web._is_hydrated  # built, not deployed: no token was needed
    web = [name for name, cls in built.pools.items() if info(cls).web_info is not None]
    assert web == []
    assert built.plan.url_pattern == f"https://<workspace>--vllm-{gpu}-serve.modal.run"


def test_every_legacy_cell_builds_with_one_web_endpoint():
    cells = MATRIX.legacy_cells()
    assert len(cells) == 15
    for fit in cells:
        key = config.legacy_key(fit.model.key, fit.gpu.key)
        built = vllm_server.build(MATRIX, key)
        assert built.app.name == f"vllm-{key}"
        web = built.web.info()
        assert web.web_info is not None
        assert web.gpus == [(fit.gpu.modal_gpu, fit.count)]
        expected = ["vllm-api-key"] + (["huggingface"] if fit.model.gated else [])
        assert secret_names(web) == expected
        assert {at: v.name for at, v in web.volumes.items()} == VOLUMES
        assert built.pools == {}


def test_a_model_that_does_not_fit_is_not_served_and_says_why(tmp_path):
    text = config.DEFAULT_PATH.read_text() + textwrap.dedent("""
      giant:
        huggingface_id: org/giant
        params_b: 150
        layers: 80
        attention_heads: 64
        kv_heads: 8
        head_dim: 128
        max_model_len: 8192
    """).replace("\n", "\n  ")
    (tmp_path / "m.yaml").write_text(text)
    matrix = config.load(tmp_path / "m.yaml")
    l40s = vllm_gpu_server.build(matrix, "l40s")  # 8 x 48 GB holds 300 GB of weights
    b200 = vllm_gpu_server.build(matrix, "b200")
    assert "giant" in l40s.pools and info(l40s.pools["giant"]).gpus == [("L40S", 8)]
    assert "giant" in b200.pools and info(b200.pools["giant"]).gpus == [("B200", 2)]
    (tmp_path / "m.yaml").write_text(text.replace("params_b: 150", "params_b: 400"))
    matrix = config.load(tmp_path / "m.yaml")
    l40s = vllm_gpu_server.build(matrix, "l40s")
    assert "giant" not in l40s.pools
    assert [f.model.key for f in l40s.plan.skipped] == ["giant"]
    with pytest.raises(config.UsageError, match="cannot be deployed: needs"):
        vllm_server.build(matrix, "giant-l40s")


def test_snapshot_pools_only_on_single_gpu_cells(tmp_path):
    text = config.DEFAULT_PATH.read_text().replace(
        "    name: google/gemma-3-27b-it\n", "    name: google/gemma-3-27b-it\n    snapshot: true\n")
    (tmp_path / "m.yaml").write_text(text)
    matrix = config.load(tmp_path / "m.yaml")
    h100 = vllm_gpu_server.build(matrix, "h100")
    l40s = vllm_gpu_server.build(matrix, "l40s")
    snap = h100.pools["gemma-3-27b"]._get_user_cls()
    multi = l40s.pools["gemma-3-27b"]._get_user_cls()
    assert issubclass(snap, gpu_pool.SnapshotEnginePool)
    assert not issubclass(multi, gpu_pool.SnapshotEnginePool)  # L40S:2, Modal cannot snapshot
    argv = next(p for p in h100.plan.pools if p.model.key == "gemma-3-27b").argv
    assert argv[-1] == "--enable-sleep-mode"
    legacy = vllm_server.build(matrix, "gemma-3-27b-h100")
    assert not legacy.plan.pools[0].snapshot
    # What the container runs, found as Modal finds it (every class of the MRO, by name):
    # a restored snapshot only wakes vLLM; it must not boot a second one.
    assert lifecycle(snap) == {"pre": ["boot_and_sleep"], "post": ["wake"], "exit": ["stop"]}
    assert lifecycle(multi) == {"pre": [], "post": ["start"], "exit": ["stop"]}
    assert sorted(_find_partial_methods_for_user_cls(snap, Flags.interface_flags())) == [
        "request", "stream"]


def lifecycle(user_cls) -> dict[str, list[str]]:
    flags = {"pre": Flags.ENTER_PRE_SNAPSHOT, "post": Flags.ENTER_POST_SNAPSHOT,
             "exit": Flags.EXIT}
    return {when: list(_find_partial_methods_for_user_cls(user_cls, flag))
            for when, flag in flags.items()}


CONTAINER_IMPORT = textwrap.dedent("""
    import importlib, sys
    from modal_proto import api_pb2
    from modal._runtime.user_code_imports import get_active_app_fallback
    module = importlib.import_module(sys.argv[1])
    for name in sys.argv[3:]:
        getattr(module, name)  # what Modal looks up by qualname
        fdef = api_pb2.Function(app_name=sys.argv[2], function_name=name)
        assert get_active_app_fallback(fdef).name == sys.argv[2], name
    print("found", *sys.argv[3:])
""")


def run_python(code: str, *args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, check=False,
                          capture_output=True, text=True, timeout=120)


def test_the_container_reimport_finds_the_same_app_and_classes():
    """Inside the container, Modal imports the module and finds app, classes and router by name."""
    env = {**os.environ, "GPU_KEY": "l40s"}
    names = ["serve", "Pool_gemma_3_12b", "Pool_gemma_3_27b", "Pool_qwen3_vl_30b"]
    done = run_python(CONTAINER_IMPORT, "vllm_gpu_server", "vllm-l40s", *names, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["found", *names]
    env = {**os.environ, "MODEL_KEY": "gemma-3-12b-l40s"}
    done = run_python(CONTAINER_IMPORT, "vllm_server", "vllm-gemma-3-12b-l40s", "serve", env=env)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(("module", "env", "message"), [
    ("vllm_gpu_server", {}, "Error: GPU_KEY is not set; valid keys: l40s, a100, h100, h200, b200"),
    ("vllm_gpu_server", {"GPU_KEY": "t4"},
     "Error: unknown GPU 't4'; valid GPU keys: l40s, a100, h100, h200, b200"),
    ("vllm_server", {}, "Error: MODEL_KEY is not set; valid keys: gemma-3-12b-l40s, "),
    ("vllm_server", {"MODEL_KEY": "gemma-3-12b-t4"}, "Error: unknown model-GPU key"),
])
def test_a_missing_or_unknown_key_is_one_line(module, env, message):
    """What `modal deploy FILE` shows: it reads the module's `app`."""
    environ = {k: v for k, v in os.environ.items() if k not in ("GPU_KEY", "MODEL_KEY")}
    code = f"import {module}; {module}.app"
    done = run_python(code, env={**environ, **env})
    assert done.returncode == 2
    assert done.stderr.startswith(message), done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) == 1


# ## The router's backend against fake pool handles


class FakeCall:
    def __init__(self, result=None, error=None, items=(), fail_after=None):
        self.result, self.error, self.items, self.fail_after = result, error, items, fail_after
        self.calls = []

    async def aio(self, *args):
        self.calls.append(args)
        if self.error:
            raise self.error
        return self.result

    async def gen(self, *args):
        self.calls.append(args)
        if self.error:
            raise self.error
        for i, item in enumerate(self.items):
            if self.fail_after is not None and i == self.fail_after:
                raise RuntimeError("engine crashed")
            yield item


class FakePool:
    def __init__(self, call: FakeCall):
        self.request = type("M", (), {"remote": type("R", (), {"aio": call.aio})})()
        self.stream = type("M", (), {"remote_gen": type("R", (), {"aio": call.gen})})()


def backend_with(call: FakeCall):
    instances = []

    def cls():
        instances.append(FakePool(call))
        return instances[-1]

    return gpu_pool.ModalBackend({"gemma-3-12b": cls}), instances


MODEL = MATRIX.models["gemma-3-12b"]
BODY = json.dumps({"model": MODEL.name, "messages": []}).encode()


def test_send_is_a_method_call_and_reuses_the_handle():
    call = FakeCall(result=(200, b'{"id": "x"}'))
    backend, instances = backend_with(call)
    assert asyncio.run(backend.send(MODEL, "/v1/chat/completions", BODY)) == (200, b'{"id": "x"}')
    asyncio.run(backend.send(MODEL, "/v1/chat/completions", BODY))
    assert call.calls == [("/v1/chat/completions", BODY)] * 2
    assert len(instances) == 1


async def collect(backend, model=MODEL):
    return [c async for c in backend.stream(model, "/v1/completions", BODY)]


def test_stream_relays_chunks_after_the_status():
    call = FakeCall(items=[200, b"data: 1\n\n", b"data: [DONE]\n\n"])
    backend, _ = backend_with(call)
    assert asyncio.run(collect(backend)) == [b"data: 1\n\n", b"data: [DONE]\n\n"]


def test_stream_error_before_the_first_chunk_carries_the_pool_status():
    body = gateway.error_body(400, "bad schema")
    backend, _ = backend_with(FakeCall(items=[400, body]))
    with pytest.raises(BackendError) as err:
        asyncio.run(collect(backend))
    assert (err.value.status, err.value.message) == (400, "bad schema")


def test_stream_failure_mid_stream_is_a_502():
    backend, _ = backend_with(FakeCall(items=[200, b"data: 1\n\n", b"x"], fail_after=2))
    chunks = []

    async def run():
        async for chunk in backend.stream(MODEL, "/v1/completions", BODY):
            chunks.append(chunk)

    with pytest.raises(BackendError) as err:
        asyncio.run(run())
    assert chunks == [b"data: 1\n\n"]
    assert err.value.status == 502 and "mid-stream" in err.value.message


@pytest.mark.parametrize(("error", "status", "retry_after", "text"), [
    (engine.EngineError("vLLM exited with code 1 before it was ready; last log lines:\nOOM"),
     503, 30, "model engine failed to start: vLLM exited with code 1 before it was ready"),
    (TimeoutError("slow"), 504, None, "model pool timed out"),
    (ConnectionResetError("gone"), 502, None, "model pool failed (ConnectionResetError)"),
])
def test_pool_failures_map_to_gateway_errors(error, status, retry_after, text):
    for run in (lambda b: b.send(MODEL, "/v1/completions", BODY), collect):
        backend, _ = backend_with(FakeCall(error=error))
        with pytest.raises(BackendError) as err:
            asyncio.run(run(backend))
        assert (err.value.status, err.value.retry_after, err.value.message) == (
            status, retry_after, text)
        assert "OOM" not in err.value.message  # the log tail stays in the container's logs


def test_plan_names_match_the_built_apps():
    for app_plan in plan.all_gpu_apps(MATRIX):
        assert vllm_gpu_server.build(MATRIX, app_plan.gpu.key).app.name == app_plan.name


# ## Inside a GPU container: a vLLM that dies after readiness retires the container


def test_a_dead_engine_retires_its_container_once(monkeypatch):
    import socket
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fake = str(Path(__file__).with_name("fake_vllm.py"))
    vllm = engine.Engine([sys.executable, fake, "ready", str(port)],
                         health_url=f"http://127.0.0.1:{port}/health")
    stops = []

    async def stop_fetching_inputs():
        stops.append(True)

    monkeypatch.setattr(modal.experimental.stop_fetching_inputs, "aio", stop_fetching_inputs,
                        raising=False)
    local = gpu_pool.LocalEngine(vllm, MODEL.key, url=f"http://127.0.0.1:{port}")

    async def call(stream: bool):
        if stream:
            return [c async for c in local.stream(MODEL, "/v1/completions", BODY)]
        return await local.send(MODEL, "/v1/completions", BODY)

    async def run():
        for stream in (False, True):  # alive but answering 5xx: an error, not a retirement
            with pytest.raises(BackendError):
                await call(stream)
        assert stops == []
        vllm.stop(grace=2)
        for stream in (False, True, False):
            with pytest.raises(BackendError):
                await call(stream)
        await local.aclose()

    vllm.start()
    try:
        vllm.wait_ready(20, poll_interval=0.05)
        asyncio.run(run())
    finally:
        vllm.stop(grace=2)
    assert stops == [True]


def test_the_legacy_gateway_retires_its_container_when_vllm_dies(monkeypatch):
    """The legacy web function boots vLLM itself; its backend must watch that same process."""

    class StartedEngine:
        def __init__(self, argv, env=None):
            self.argv = argv
            started.append(self)

        def start(self):
            pass

        def wait_ready(self, timeout):
            return 0.0

        def stop(self):
            pass

    started = []
    monkeypatch.setattr(engine, "Engine", StartedEngine)
    monkeypatch.setattr(vllm_server, "_BUILT", {})
    monkeypatch.setenv("MODEL_KEY", "gemma-3-12b-l40s")
    monkeypatch.setenv("API_KEY", "k" * 20)
    app = vllm_server.serve()
    assert started[0].argv[:3] == ["vllm", "serve", "google/gemma-3-12b-it"]
    assert isinstance(app.backend, gpu_pool.LocalEngine) and app.backend.engine is started[0]


@pytest.mark.parametrize("stream", [False, True])
def test_a_starting_engine_in_the_pool_is_a_503_with_retry_after(stream):
    error = gateway.error_body(503, "backend for 'x' is starting")
    call = FakeCall(result=(503, error), items=[503, error])
    backend, _ = backend_with(call)
    app = gateway.build_app([MODEL], backend, api_key="k" * 20)

    async def post():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            return await client.post("/v1/completions", json={**json.loads(BODY), "stream": stream},
                                     headers={"Authorization": "Bearer " + "k" * 20})

    response = asyncio.run(post())
    assert response.status_code == 503 and response.headers["retry-after"] == "10"
    assert response.json()["error"]["message"] == "backend for 'x' is starting"
