"""The Modal apps, built offline with no token (HOME is an empty directory, see conftest).

What each module builds is read from its own record (`gpu_pool.Built`) and
from Modal's `Function.info()`, never from `App.registered_functions`, which
Modal removes in 1.7.
"""

import asyncio
import json
import logging
import os
import subprocess
import sys
import textwrap
import time

import httpx
import modal
import modal_fakes
import pytest
from modal._partial_function import _find_partial_methods_for_user_cls
from modal._partial_function import _PartialFunctionFlags as Flags
from servers import ThreadServer, wait_until
from standin import StandIn, standin_server

import config
import engine
import gateway
import gpu_pool
import plan
import pool_state
import router_backend
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


def every_built_app(matrix=MATRIX):
    for gpu in matrix.gpus:
        yield vllm_gpu_server.build(matrix, gpu)
    for fit in matrix.legacy_cells():
        yield vllm_server.build(matrix, config.legacy_key(fit.model.key, fit.gpu.key))


def test_timeouts_nest_in_every_built_app(tmp_path):
    """Modal's timeouts exclude scheduling, so the router, whose clock runs while a pool queues
    and starts, allows startup + request (plus its margin to answer), capped at 24 h."""
    long_text = config.DEFAULT_PATH.read_text().replace(
        "startup_timeout_seconds: 1800", "startup_timeout_seconds: 50000").replace(
        "request_timeout_seconds: 3600", "request_timeout_seconds: 50000")
    (tmp_path / "long.yaml").write_text(long_text)
    for matrix, router in ((MATRIX, 1800 + 3600 + 60), (config.load(tmp_path / "long.yaml"),
                                                        24 * 3600)):
        d = matrix.defaults
        for built in every_built_app(matrix):
            web = built.web.info()
            if built.plan.kind == "legacy":  # the web function is the engine: no router
                assert (web.startup_timeout, web.timeout) == (d.startup_timeout_seconds,
                                                              d.request_timeout_seconds)
                continue
            assert web.timeout == router, built.plan.name
            assert web.timeout >= min(d.startup_timeout_seconds + d.request_timeout_seconds,
                                      24 * 3600)
            assert plan.timeouts(d).router_wait == router - plan.ROUTER_TIMEOUT_MARGIN
            for cls in built.pools.values():
                assert (info(cls).startup_timeout, info(cls).timeout) == (
                    d.startup_timeout_seconds, d.request_timeout_seconds)


def test_the_dry_run_shows_the_timeouts_the_apps_are_built_with():
    from typer.testing import CliRunner

    import deploy

    result = CliRunner().invoke(deploy.cli, ["--gpu", "h100", "--dry-run", "--json"])
    (app,) = json.loads(result.stdout)
    router = vllm_gpu_server.build(MATRIX, "h100").web.info().timeout
    assert app["timeouts"] == {"router_seconds": router, "router_waits_seconds": router - 60,
                               "startup_seconds": 1800, "request_seconds": 3600}
    result = CliRunner().invoke(deploy.cli, ["--gpu", "h100", "--dry-run"])
    assert ("  timeouts   pools 30 min to start, 60 min a request; router 91 min (waits 90 min "
            "for a pool: both, as a wait for a GPU is in neither)") in result.stdout.splitlines()
    result = CliRunner().invoke(deploy.cli, ["--model", "gemma-3-12b-l40s", "--dry-run"])
    assert "  timeouts   30 min to start, 60 min a request" in result.stdout.splitlines()


def mounted_modules(function) -> list[str]:
    """Every Python module the function's container gets: its own mounts and its image's."""
    from pathlib import Path

    from modal._utils.async_utils import synchronizer
    from modal.mount import _Mount

    spec = synchronizer._translate_in(function)._spec
    found = []

    def entries(mount) -> None:
        for entry in mount._entries or []:
            name, local = getattr(entry, "module_name", None), str(getattr(entry, "local_file", ""))
            if name or local.endswith(".py"):
                found.append(name or Path(local).stem)

    def walk(image) -> None:
        for dep in image._deps():
            entries(dep) if isinstance(dep, _Mount) else walk(dep)

    for mount in spec.mounts:
        entries(mount)
    walk(spec.image)
    return found


def test_each_project_module_is_mounted_once():
    for built in every_built_app():
        module = "vllm_gpu_server" if built.plan.kind == "gpu" else "vllm_server"
        functions = [built.web] + [c._get_class_service_function() for c in built.pools.values()]
        for function in functions:
            assert sorted(mounted_modules(function)) == sorted(
                [*gpu_pool.PROJECT_MODULES, module]), built.plan.name


def test_models_yaml_can_pin_the_exact_gpu(tmp_path):
    """Modal may serve "H100" with an H200; "H100!" pins it (the count still comes from the fit)."""
    text = config.DEFAULT_PATH.read_text()
    (tmp_path / "pinned.yaml").write_text(text.replace("modal_gpu: H100,", "modal_gpu: H100!,"))
    built = vllm_gpu_server.build(config.load(tmp_path / "pinned.yaml"), "h100")
    assert {info(cls).gpus[0] for cls in built.pools.values()} == {("H100!", 1)}
    (tmp_path / "bad.yaml").write_text(text.replace("modal_gpu: H100,", "modal_gpu: H100:2,"))
    with pytest.raises(config.ConfigError) as err:
        config.load(tmp_path / "bad.yaml")
    assert str(err.value) == (
        f"{tmp_path / 'bad.yaml'}: gpus.h100.modal_gpu: 'H100:2' is not a Modal GPU type such as "
        "L40S, A100-80GB, H100 or H100! (the count comes from the fit check)")


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


# ## The router's backend against pools on the SDK fakes (tests/modal_fakes.py)
#
# The pools are the project's own classes (request, stream, enter hooks, failure records);
# only vLLM is a stand-in server. `pool.running()` counts the inputs a pool is working on:
# a slot held.

MODEL = MATRIX.models["gemma-3-12b"]
H100 = plan.gpu_app(MATRIX, "h100")
BODY = json.dumps({"model": MODEL.name, "messages": [{"role": "user", "content": "Hi"}]}).encode()
LONG = json.dumps({"model": MODEL.name, "prompt": " ".join(["word"] * 300),
                   "max_tokens": 300, "stream": True}).encode()  # ~300 chunks
OOM = "vLLM exited with code 1 before it was ready; last log lines:\nCUDA out of memory"


@pytest.fixture
def workspace(monkeypatch):
    """Modal as the SDK behaves, with cancellations delivered every 0.2 s instead of 15 s."""
    return modal_fakes.Workspace(heartbeat=0.2).patch(monkeypatch)


@pytest.fixture
def vllm():
    with ThreadServer(StandIn([MODEL.name, MODEL.key])) as server:
        yield server


def engine_pool(workspace, url="", fail=None, **options) -> modal_fakes.Pool:
    return workspace.pool(modal_fakes.engine_pool_class(H100, MODEL.key, url=url, fail=fail),
                          **options)


def run_backend(workspace, pool, body, **options):
    """Run `body(backend)` on a ModalBackend in front of `pool`, then stop everything."""

    async def main():
        backend = router_backend.ModalBackend({MODEL.key: pool}, **options)
        try:
            return await body(backend)
        finally:
            await backend.aclose()
            await workspace.shutdown()

    return asyncio.run(main())


async def eventually(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


def test_send_spawns_a_call_and_passes_the_pools_timing_on(workspace, vllm):
    pool = engine_pool(workspace, vllm.url)

    async def body(backend):
        headers = []
        answer = await backend.send(MODEL, gateway.CHAT, BODY, headers)
        await backend.send(MODEL, gateway.CHAT, BODY, [])
        return answer, headers

    (status, raw), headers = run_backend(workspace, pool, body)
    assert status == 200
    assert json.loads(raw)["choices"][0]["message"]["content"].startswith("This is the stand-in")
    assert [(k, v.split(b"=")[0]) for k, v in headers] == [
        (b"server-timing", b"engine;dur"), (b"server-timing", b"pool;dur")]
    # Spawned (a FunctionCall, then its result), one container for both, the handle reused.
    assert workspace.rpcs["FunctionMap"] == 2 and workspace.rpcs["FunctionGetOutputs"] == 2
    assert pool.boots == 1 and [i.method for i in pool.inputs] == ["request", "request"]


async def collect(backend, body=None, path=gateway.COMPLETIONS):
    return [c async for c in backend.stream(MODEL, path, body or STREAM_BODY, [])]


STREAM_BODY = json.dumps({"model": MODEL.name, "prompt": "Hi", "stream": True}).encode()


def test_stream_relays_the_engines_chunks(workspace, vllm):
    chunks = run_backend(workspace, engine_pool(workspace, vllm.url), collect)
    events = b"".join(chunks).split(b"\n\n")
    assert events[0].startswith(b"data: {") and events[-2] == b"data: [DONE]"
    assert [i.method for i in workspace.pools[0].inputs] == ["stream"]


def test_stream_error_before_the_first_chunk_carries_the_pools_status(workspace, vllm):
    bad = json.dumps({"model": MODEL.name, "stream": True}).encode()  # no prompt
    with pytest.raises(BackendError) as err:
        run_backend(workspace, engine_pool(workspace, vllm.url), lambda b: collect(b, bad))
    assert (err.value.status, err.value.message) == (400, "prompt: Field required")


def test_stream_failure_mid_stream_is_a_502():
    broken = StandIn([MODEL.name], break_after=2)
    chunks = []

    async def body(backend):
        async for chunk in backend.stream(MODEL, gateway.COMPLETIONS, STREAM_BODY, []):
            chunks.append(chunk)

    with ThreadServer(broken) as server, pytest.MonkeyPatch.context() as mp:
        workspace = modal_fakes.Workspace().patch(mp)
        with pytest.raises(BackendError) as err:
            run_backend(workspace, engine_pool(workspace, server.url), body)
    assert b"".join(chunks).count(b"data: {") == 2
    assert (err.value.status, err.value.message) == (
        502, f"model pool failed mid-stream: backend for '{MODEL.name}' broke off the stream")


@pytest.mark.parametrize(("error", "status", "retry_after", "text"), [
    (engine.EngineError(OOM), 503, 30,
     "model engine failed to start: vLLM exited with code 1 before it was ready"),
    (modal.exception.FunctionTimeoutError("Function timed out"), 504, None,
     "model pool timed out"),
    (modal.exception.OutputExpiredError(), 504, None, "model pool timed out"),
    (TimeoutError(), 504, None, "model pool timed out"),  # FunctionCall.get(timeout=)
    (modal.exception.InternalFailure("input lost"), 503, 10,
     "Modal could not run the request (InternalFailure); retry"),
    (modal.exception.ConnectionError("reset"), 503, 10,
     "Modal could not run the request (ConnectionError); retry"),
    (modal.exception.RemoteError("container exited (OOM killed)"), 502, None,
     "model pool failed (container exited (OOM killed))"),
    (modal.exception.RemoteError(""), 502, None, "model pool failed (RemoteError)"),
    (modal.exception.ExecutionError("Could not deserialize remote exception"), 502, None,
     "model pool failed (ExecutionError)"),
    (ConnectionResetError("gone"), 502, None, "model pool failed (ConnectionResetError)"),
])
def test_modal_exceptions_map_to_gateway_errors(error, status, retry_after, text):
    mapped = router_backend.pool_failure(error)
    assert (mapped.status, mapped.retry_after, mapped.message) == (status, retry_after, text)
    assert "out of memory" not in mapped.message  # the log tail stays in the container's logs
    assert not isinstance(modal.exception.FunctionTimeoutError(), TimeoutError)  # the trap


def test_a_pool_timeout_raised_by_modal_is_a_504(workspace):
    slow = StandIn([MODEL.name], delay=30)
    with ThreadServer(slow) as server:
        pool = engine_pool(workspace, server.url, timeout=0.3)
        with pytest.raises(BackendError) as err:
            run_backend(workspace, pool, lambda b: b.send(MODEL, gateway.CHAT, BODY, []))
    assert (err.value.status, err.value.message) == (504, "model pool timed out")
    assert isinstance(pool.inputs[0].result.exception(), modal.exception.FunctionTimeoutError)


def test_the_router_answers_504_itself_at_its_deadline(workspace):
    slow = StandIn([MODEL.name], delay=30)
    with ThreadServer(slow) as server:
        pool = engine_pool(workspace, server.url)

        async def body(backend):
            with pytest.raises(BackendError) as err:
                await backend.send(MODEL, gateway.CHAT, BODY, [])
            await eventually(lambda: pool.running() == 0)  # the call was cancelled too
            return err.value

        error = run_backend(workspace, pool, body, deadline=0.3)
        assert wait_until(lambda: slow.disconnects == [gateway.CHAT])
    assert error.status == 504 and error.message.startswith("model pool gave no answer within 0.3 s")


# ## A client that leaves frees its slot on the pool


def test_a_client_that_leaves_cancels_the_spawned_call_on_the_pool(workspace):
    slow = StandIn([MODEL.name], delay=30)
    with ThreadServer(slow) as server:
        pool = engine_pool(workspace, server.url)

        async def body(backend):
            request = asyncio.ensure_future(backend.send(MODEL, gateway.CHAT, BODY, []))
            await eventually(lambda: pool.running() == 1)
            request.cancel()  # what the gateway does when its client disconnects
            with pytest.raises(asyncio.CancelledError):
                await request
            await eventually(lambda: pool.running() == 0)  # within a heartbeat

        run_backend(workspace, pool, body)
        assert wait_until(lambda: slow.disconnects == [gateway.CHAT])  # vLLM aborts
    assert workspace.rpcs["FunctionCallCancel"] == 1
    assert isinstance(pool.inputs[0].result.exception(), modal.exception.RemoteError)


def test_a_stream_whose_client_left_stops_generating_on_the_pool(workspace):
    slow = StandIn([MODEL.name], token_delay=0.05)  # 300 chunks: 15 s
    with ThreadServer(slow) as server:
        pool = engine_pool(workspace, server.url)

        async def body(backend):
            chunks = backend.stream(MODEL, gateway.COMPLETIONS, LONG, [])
            read = [await anext(chunks) for _ in range(3)]
            started = time.monotonic()
            await chunks.aclose()  # the gateway closes it when its client leaves
            await eventually(lambda: pool.running() == 0)
            return read, time.monotonic() - started

        read, stopped_after = run_backend(workspace, pool, body)
        assert wait_until(lambda: slow.disconnects == [gateway.COMPLETIONS])
    assert len(read) == 3 and stopped_after < 5  # not the 15 s of the whole generation
    assert workspace.rpcs["QueuePut"] == 1  # the mark: one RPC, only for a client that left


def test_a_stream_that_ends_sends_no_cancel_mark(workspace, vllm):
    run_backend(workspace, engine_pool(workspace, vllm.url), collect)
    assert workspace.rpcs["QueuePut"] == 0


def test_a_cancel_mark_the_full_queue_refuses_is_given_up_not_retried_for_ever(
        workspace, monkeypatch, caplog):
    # Without a timeout the SDK retries a full Queue's put for ever (modal/queue.py,
    # _put_many_blocking), and every client that left would keep a task in the router.
    monkeypatch.setattr(pool_state, "MARK_TIMEOUT_SECONDS", 0.3)
    slow = StandIn([MODEL.name], token_delay=0.05)
    with ThreadServer(slow) as server:
        pool = engine_pool(workspace, server.url)
        marks = pool_state.CancelMarks()
        marks.queue().max_partitions = 0  # full: every new partition is refused

        async def body(backend):
            chunks = backend.stream(MODEL, gateway.COMPLETIONS, LONG, [])
            await anext(chunks)
            await chunks.aclose()
            started = time.monotonic()
            await eventually(lambda: not backend._background)
            for inp in pool.inputs:  # the pool generates on: nothing stopped it
                inp.task.cancel()
            return time.monotonic() - started

        with caplog.at_level(logging.WARNING, logger="router"):
            given_up_after = run_backend(workspace, pool, body, cancel_marks=marks)
    assert given_up_after < 5
    assert "marking a stream cancelled failed: Full" in caplog.text


# ## An engine that cannot start: the crash loop, and the failure record


def test_a_crash_loop_escalated_by_modal_is_a_503_with_the_reason(workspace):
    workspace.boot_attempts = 3
    pool = engine_pool(workspace, fail=lambda: OOM)
    with pytest.raises(BackendError) as err:
        run_backend(workspace, pool, lambda b: b.send(MODEL, gateway.CHAT, BODY, []))
    assert (err.value.status, err.value.retry_after) == (503, 30)
    assert err.value.message == ("model engine failed to start: vLLM exited with code 1 before "
                                 "it was ready")
    assert pool.boots == 3 and len(pool.boot_errors) == 3  # a new container each time
    record = workspace.dicts[plan.STATE_DICT].data[f"failure:vllm-h100:{MODEL.key}"]
    assert record["error"] == "vLLM exited with code 1 before it was ready"


def test_a_fresh_failure_record_answers_503_at_once_and_a_good_start_clears_it(
        workspace, vllm, monkeypatch):
    monkeypatch.setattr(pool_state, "SLOW_CALL_SECONDS", 0.2)
    monkeypatch.setattr(pool_state, "CHECK_EVERY_SECONDS", 0.2)
    workspace.boot_attempts, workspace.restart_delay = 1000, 0.05  # Modal keeps trying
    broken = {"reason": OOM}
    pool = engine_pool(workspace, vllm.url, fail=lambda: broken["reason"])
    failures = pool_state.FailureWatch("vllm-h100")
    key = f"failure:vllm-h100:{MODEL.key}"

    async def body(backend):
        with pytest.raises(BackendError) as first:  # waits, then reads the record
            await backend.send(MODEL, gateway.CHAT, BODY, [])
        await eventually(lambda: pool.running() == 0 and not pool.pending)
        calls, looks = workspace.rpcs["FunctionMap"], workspace.rpcs["DictGet"]
        started = time.monotonic()
        with pytest.raises(BackendError) as second:  # at once: no call, no look-up
            await backend.stream(MODEL, gateway.COMPLETIONS, STREAM_BODY, []).__anext__()
        at_once = time.monotonic() - started
        assert (workspace.rpcs["FunctionMap"], workspace.rpcs["DictGet"]) == (calls, looks)
        # The record goes stale; the next call starts a container that works and clears it.
        broken["reason"] = ""
        workspace.dicts[plan.STATE_DICT].data[key]["at"] -= pool_state.FRESH_SECONDS
        answer = await backend.send(MODEL, gateway.CHAT, BODY, [])
        return first.value, second.value, at_once, answer

    first, second, at_once, answer = run_backend(workspace, pool, body, failures=failures)
    for error in (first, second):
        assert error.status == 503 and 250 <= error.retry_after <= 300
        assert error.message.startswith("model engine failed to start ")
        assert error.message.endswith(" s ago: vLLM exited with code 1 before it was ready")
    assert at_once < 1.0  # generous for a loaded machine; the RPC counts above are the proof
    assert answer[0] == 200
    assert key not in workspace.dicts[plan.STATE_DICT].data
    assert workspace.rpcs["DictGet"] >= 1


def test_a_failure_older_than_the_pools_last_answer_does_not_count(workspace):
    """A replica that answers outweighs another that could not start (a failed scale-up)."""
    watch = pool_state.FailureWatch("vllm-h100")
    records = workspace.dict_from_name(plan.STATE_DICT, create_if_missing=True).data
    key = f"failure:vllm-h100:{MODEL.key}"

    async def run():
        records[key] = {"error": "OOM", "at": time.time() - 1}
        assert (await watch.check(MODEL.key))["error"] == "OOM"
        assert watch.known(MODEL.key)["error"] == "OOM"
        watch.pool_answered(MODEL.key)
        assert watch.known(MODEL.key) is None and await watch.check(MODEL.key) is None
        records[key] = {"error": "later", "at": time.time() + 1}  # after that answer: counts
        assert (await watch.check(MODEL.key))["error"] == "later"
        records[key]["at"] -= pool_state.FRESH_SECONDS + 2  # stale: does not
        assert watch.known(MODEL.key) is None and await watch.check(MODEL.key) is None

    asyncio.run(run())


def test_a_healthy_pool_costs_no_record_look_up(workspace, vllm):
    pool = engine_pool(workspace, vllm.url)
    failures = pool_state.FailureWatch("vllm-h100")
    run_backend(workspace, pool, lambda b: b.send(MODEL, gateway.CHAT, BODY, []),
                failures=failures)
    assert workspace.rpcs["DictGet"] == 0


def test_the_pool_records_the_gpu_it_got(workspace, vllm, tmp_path, monkeypatch):
    modal_fakes.fake_nvidia_smi(tmp_path, monkeypatch, "NVIDIA H200, 580.82.07")
    pool = engine_pool(workspace, vllm.url)

    async def body(backend):
        headers = []
        await backend.send(MODEL, gateway.CHAT, BODY, headers)
        return dict(headers)

    headers = run_backend(workspace, pool, body)
    assert headers[b"x-vllm-gpu"] == b"NVIDIA H200; count=1; driver=580.82.07; vllm=unknown"
    record = workspace.dicts[plan.STATE_DICT].data[f"gpu:vllm-h100:{MODEL.key}"]
    assert {k: record[k] for k in ("name", "count", "driver")} == {
        "name": "NVIDIA H200", "count": 1, "driver": "580.82.07"}


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


def test_the_legacy_gateway_retires_its_container_when_vllm_dies(monkeypatch, workspace):
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
    assert app.handoff_after == gpu_pool.HANDOFF_AFTER  # Modal's 303 is not a client leaving


def test_the_router_waits_for_its_pools_then_answers_itself(monkeypatch):
    monkeypatch.setattr(vllm_gpu_server, "_BUILT", {})
    monkeypatch.setenv("GPU_KEY", "h100")
    monkeypatch.setenv("API_KEY", "k" * 20)
    app = vllm_gpu_server.serve()
    backend = app.backend
    assert isinstance(backend, router_backend.ModalBackend)
    assert backend.deadline == plan.timeouts(MATRIX.defaults).router_wait == 5400
    assert backend.failures.app == "vllm-h100" and backend.cancel_marks.ttl == 5400
    assert app.handoff_after == gpu_pool.HANDOFF_AFTER == 120


def test_a_legacy_app_records_why_its_vllm_did_not_start(monkeypatch, workspace):
    class FailingEngine:
        def __init__(self, argv, env=None):
            pass

        def start(self):
            pass

        def wait_ready(self, timeout):
            raise engine.EngineError(OOM)

        def stop(self):
            pass

    monkeypatch.setattr(engine, "Engine", FailingEngine)
    monkeypatch.setattr(vllm_server, "_BUILT", {})
    monkeypatch.setenv("MODEL_KEY", "gemma-3-12b-l40s")
    monkeypatch.setenv("API_KEY", "k" * 20)
    with pytest.raises(engine.EngineError):  # Modal restarts the container, as before
        vllm_server.serve()
    record = workspace.dicts[plan.STATE_DICT].data["failure:vllm-gemma-3-12b-l40s:gemma-3-12b"]
    assert record["error"] == "vLLM exited with code 1 before it was ready"


@pytest.mark.parametrize("stream", [False, True])
def test_a_starting_engine_in_the_pool_is_a_503_with_retry_after(workspace, stream):
    starting = StandIn([MODEL.name], ready_after=60)

    async def post(backend):
        app = gateway.build_app([MODEL], backend, api_key="k" * 20)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            return await client.post("/v1/completions", json={**json.loads(STREAM_BODY),
                                                               "stream": stream},
                                     headers={"Authorization": "Bearer " + "k" * 20})

    with standin_server(starting, wait=False) as server:  # vLLM refuses until it is ready
        response = run_backend(workspace, engine_pool(workspace, server.url), post)
    assert response.status_code == 503 and response.headers["retry-after"] == "10"
    assert response.json()["error"]["message"] == (
        f"backend for '{MODEL.name}' is starting or down: connection refused")
