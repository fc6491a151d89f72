"""engine.py: the vllm serve argv for every cell of the matrix, and the process life cycle."""

import os
import sys
import time
from pathlib import Path

import pytest
from servers import free_port, wait_until

import config
import engine

FAKE = str(Path(__file__).with_name("fake_vllm.py"))
MATRIX = config.load()

COMMON = ["--host", "127.0.0.1", "--port", "8000", "--dtype", "bfloat16",
          "--max-model-len", "32768", "--gpu-memory-utilization", "0.92"]
GEMMA_VISION = ["--limit-mm-per-prompt", '{"image":4,"video":0}', "--enforce-eager"]


def expected_argv(model: str, tp: int) -> list[str]:
    hf = {"gemma-3-12b": "google/gemma-3-12b-it", "gemma-3-27b": "google/gemma-3-27b-it",
          "qwen3-vl-30b": "Qwen/Qwen3-VL-30B-A3B-Instruct"}[model]
    tools = ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"] if model.startswith(
        "qwen") else []
    return (["vllm", "serve", hf, "--served-model-name", hf, model, *COMMON,
             "--tensor-parallel-size", str(tp), *tools, *GEMMA_VISION])


# Two GPUs only where the big models meet the 48 GB L40S.
CELLS = [(m, g, 2 if (g == "l40s" and m != "gemma-3-12b") else 1)
         for m in ("gemma-3-12b", "gemma-3-27b", "qwen3-vl-30b")
         for g in ("l40s", "a100", "h100", "h200", "b200")]


@pytest.mark.parametrize(("model", "gpu", "tp"), CELLS)
def test_argv_for_every_cell(model, gpu, tp):
    fit = MATRIX.fit(MATRIX.models[model], MATRIX.gpu(gpu))
    assert engine.engine_argv(fit, MATRIX.defaults) == expected_argv(model, tp)


def test_argv_sleep_mode_and_options():
    fit = MATRIX.fit(MATRIX.models["gemma-3-12b"], MATRIX.gpu("h100"))
    argv = engine.engine_argv(fit, MATRIX.defaults, sleep_mode=True, port=9000)
    assert argv[-1] == "--enable-sleep-mode"
    assert argv[argv.index("--port") + 1] == "9000"
    assert engine.engine_env(True)["VLLM_SERVER_DEV_MODE"] == "1"
    assert "VLLM_SERVER_DEV_MODE" not in engine.engine_env(False)


def test_argv_without_fast_boot_has_no_enforce_eager(tmp_path):
    text = config.DEFAULT_PATH.read_text().replace("fast_boot: true", "fast_boot: false")
    (tmp_path / "m.yaml").write_text(text)
    matrix = config.load(tmp_path / "m.yaml")
    fit = matrix.fit(matrix.models["gemma-3-12b"], matrix.gpu("h100"))
    assert "--enforce-eager" not in engine.engine_argv(fit, matrix.defaults)


@pytest.fixture
def started():
    engines = []

    def start(*args: str) -> engine.Engine:
        port = free_port()
        argv = [sys.executable, FAKE, *[a.replace("PORT", str(port)) for a in args]]
        e = engine.Engine(argv, health_url=f"http://127.0.0.1:{port}/health")
        e.start()
        engines.append(e)
        return e

    yield start
    for e in engines:
        e.stop(grace=2)
        assert not e.running()


def test_ready_after_a_delay(started):
    e = started("ready", "PORT", "0.5")
    waited = e.wait_ready(timeout=20, poll_interval=0.05)
    assert 0 < waited < 20
    assert e.running()
    assert "Application startup complete." in e.log_tail()


def test_dies_before_ready_reports_exit_code_and_log_tail(started):
    e = started("die")
    t0 = time.monotonic()
    with pytest.raises(engine.EngineError) as err:
        e.wait_ready(timeout=30, poll_interval=0.05)
    assert time.monotonic() - t0 < 10  # fails at once, not at the deadline
    message = str(err.value)
    assert message.startswith("vLLM exited with code 3 before it was ready")
    assert "CUDA out of memory" in message


def test_misses_the_deadline_and_is_stopped(started):
    e = started("hang")
    with pytest.raises(engine.EngineError) as err:
        e.wait_ready(timeout=1.0, poll_interval=0.05)
    assert str(err.value).startswith("vLLM was not ready after 1 s")
    assert "starting fake vllm" in str(err.value)
    assert not e.running()


def test_stop_ends_the_process_group(started):
    e = started("ready", "PORT")
    e.wait_ready(timeout=20, poll_interval=0.05)
    e.stop(grace=2)
    assert e.process.returncode is not None


def test_stop_ends_workers_that_outlive_vllm(started, tmp_path):
    pidfile = tmp_path / "worker.pid"
    e = started("orphan", str(pidfile))
    assert wait_until(lambda: not e.running() and pidfile.exists() and pidfile.read_text())
    worker = int(pidfile.read_text())
    assert alive(worker)
    e.stop(grace=2)
    assert wait_until(lambda: not alive(worker))




def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
