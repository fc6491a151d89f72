"""The cold path on Modal, end to end over loopback HTTP: real clients (the openai SDK, httpx,
curl) -> Modal's web ingress (tests/modal_ingress.py) -> the router's gateway and backend ->
the project's pool class on the SDK fakes (tests/modal_fakes.py) -> a stand-in vLLM.

Modal's 150 s limit is 1.5 s here and the router's hand-off threshold 1 s; a container
learns of a cancellation every 0.2 s instead of every 15 s.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from contextlib import contextmanager
from typing import ClassVar

import httpx
import modal
import modal_fakes
import openai
import pytest
from modal_ingress import ModalIngress
from servers import ThreadServer, wait_until
from standin import StandIn

import config
import gateway
import plan
import router_backend

MATRIX = config.load()
MODEL = MATRIX.models["gemma-3-12b"]
H100 = plan.gpu_app(MATRIX, "h100")
KEY = "k" * 24
LIMIT = 1.5  # Modal's 150 s
HANDOFF_AFTER = 1.0  # gpu_pool.HANDOFF_AFTER: Modal's limit less a margin
SLOW = 2.4  # a request that outlasts the limit
MESSAGES = [{"role": "user", "content": "Classify: vLLM is wonderful!"}]


@pytest.fixture
def workspace(monkeypatch):
    return modal_fakes.Workspace(heartbeat=0.2).patch(monkeypatch)


@contextmanager
def endpoint(workspace, vllm: StandIn, *, disconnect_at_handoff: bool = True,
             handoff_after: float | None = HANDOFF_AFTER, keepalive: float = 10.0):
    """A GPU app's endpoint as Modal would serve it, with `vllm` behind its one pool."""
    with ThreadServer(vllm) as engine:
        pool = workspace.pool(modal_fakes.engine_pool_class(H100, MODEL.key, url=engine.url))
        backend = router_backend.ModalBackend({MODEL.key: pool})
        app = gateway.build_app([MODEL], backend, api_key=KEY, handoff_after=handoff_after,
                                keepalive_interval=keepalive)
        ingress = ModalIngress(app, limit=LIMIT, disconnect_at_handoff=disconnect_at_handoff,
                               on_shutdown=workspace.shutdown)
        with ThreadServer(ingress) as server:
            yield server.url, ingress, pool


def ask_openai(url: str) -> str:
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=30)
    reply = client.chat.completions.create(model=MODEL.name, messages=MESSAGES, max_tokens=8)
    return reply.choices[0].message.content


def ask_httpx(url: str) -> str:
    reply = httpx.post(url + gateway.CHAT, json={"model": MODEL.name, "messages": MESSAGES,
                                                 "max_tokens": 8},
                       headers={"Authorization": f"Bearer {KEY}"}, follow_redirects=True,
                       timeout=30)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["message"]["content"]


def ask_curl(url: str, *extra: str) -> str:
    """The README's curl, with -L: -d makes it a POST, which a 303 turns into a GET."""
    if shutil.which("curl") is None:  # CI needs python3 only
        pytest.skip("curl is not installed")
    body = json.dumps({"model": MODEL.name, "messages": MESSAGES, "max_tokens": 8})
    done = subprocess.run(["curl", "-sS", "-L", *extra, url + gateway.CHAT,
                           "-H", f"Authorization: Bearer {KEY}",
                           "-H", "Content-Type: application/json", "-d", body],
                          capture_output=True, text=True, timeout=60, check=True)
    try:
        return json.loads(done.stdout)["choices"][0]["message"]["content"]
    except ValueError:
        return done.stdout


# ## Requests longer than Modal's limit survive its hand-off


@pytest.mark.parametrize("disconnect_at_handoff", [True, False], ids=["disconnect", "silent"])
@pytest.mark.parametrize("ask", [ask_openai, ask_httpx, ask_curl], ids=["openai", "httpx", "curl"])
def test_a_request_longer_than_the_limit_is_answered_at_the_result_url(
        workspace, ask, disconnect_at_handoff):
    vllm = StandIn([MODEL.name], delay=SLOW)
    with endpoint(workspace, vllm, disconnect_at_handoff=disconnect_at_handoff) as (
            url, ingress, pool):
        answer = ask(url)
        assert answer.startswith("This is the stand-in answering")
        assert ingress.handoffs == [gateway.CHAT]  # the 303 happened
        assert ingress.result_fetches == ["GET"]  # and the client followed it with a GET
        assert vllm.disconnects == []  # the generation was not cut at the hand-off
        assert len(pool.inputs) == 1 and workspace.rpcs["FunctionCallCancel"] == 0


def test_without_the_hand_off_rule_the_answer_is_lost(workspace):
    """What the gateway did before: the disconnect at the hand-off read as a client leaving."""
    vllm = StandIn([MODEL.name], delay=SLOW)
    with endpoint(workspace, vllm, handoff_after=None) as (url, ingress, _):
        with pytest.raises(openai.InternalServerError):
            ask_openai(url)
        assert ingress.handoffs == [gateway.CHAT]
        assert wait_until(lambda: vllm.disconnects == [gateway.CHAT])


def test_curl_with_x_post_keeps_post_on_the_redirect_and_is_refused(workspace):
    """`curl -L -X POST` re-POSTs to the result URL, which wants a GET: use -d without -X."""
    vllm = StandIn([MODEL.name], delay=SLOW)
    with endpoint(workspace, vllm) as (url, ingress, _):
        assert ask_curl(url, "-X", "POST") == "modal-http: bad redirect method"
        assert ingress.result_fetches == ["POST"]


def test_a_second_hand_off_redirects_to_the_same_result_url(workspace):
    vllm = StandIn([MODEL.name], delay=2 * LIMIT + 0.6)  # outlasts the limit twice
    with endpoint(workspace, vllm) as (url, ingress, _):
        assert ask_httpx(url).startswith("This is the stand-in answering")
        assert ingress.handoffs == [gateway.CHAT, gateway.CHAT]
        assert ingress.result_fetches == ["GET", "GET"]


# ## A client that leaves early frees its slot on the pool


def test_a_client_that_leaves_before_the_hand_off_frees_the_pools_slot(workspace):
    vllm = StandIn([MODEL.name], delay=30)
    with endpoint(workspace, vllm) as (url, ingress, pool):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + gateway.CHAT, json={"model": MODEL.name, "messages": MESSAGES},
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=0.3)
        assert wait_until(lambda: vllm.disconnects == [gateway.CHAT], timeout=10)
        assert wait_until(lambda: pool.running() == 0, timeout=10)
        assert workspace.rpcs["FunctionCallCancel"] == 1 and ingress.handoffs == []


def test_a_streaming_client_that_leaves_stops_the_generation(workspace):
    vllm = StandIn([MODEL.name], token_delay=0.05)
    prompt = " ".join(["word"] * 300)  # about 300 chunks: 15 s
    with endpoint(workspace, vllm) as (url, _, pool):
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=30)
        stream = client.completions.create(model=MODEL.name, prompt=prompt, max_tokens=300,
                                           stream=True)
        for _, _chunk in zip(range(3), stream, strict=False):
            pass
        stream.close()
        assert wait_until(lambda: vllm.disconnects == [gateway.COMPLETIONS], timeout=5)
        assert wait_until(lambda: pool.running() == 0, timeout=5)
        assert workspace.rpcs["QueuePut"] == 1


# ## Where the time goes, and the GPU got


def test_every_answer_says_where_the_time_went_and_which_gpu_served_it(
        workspace, tmp_path, monkeypatch):
    modal_fakes.fake_nvidia_smi(tmp_path, monkeypatch, "NVIDIA H200, 580.82.07")
    vllm = StandIn([MODEL.name], delay=0.2)
    with endpoint(workspace, vllm) as (url, _, _):
        reply = httpx.post(url + gateway.CHAT, json={"model": MODEL.name, "messages": MESSAGES},
                           headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        health = httpx.get(url + "/health")
    timings = timing(reply.headers.get_list("server-timing"))
    assert sorted(timings) == ["engine", "gateway", "pool"]
    assert timings["engine"] >= 200 and timings["pool"] >= timings["engine"]
    assert timings["gateway"] < timings["engine"]  # its own time, not the wait
    assert reply.headers["x-vllm-gpu"] == "NVIDIA H200; count=1; driver=580.82.07; vllm=unknown"
    assert list(timing(health.headers.get_list("server-timing"))) == ["gateway"]


def test_a_stream_whose_status_went_out_early_gets_its_timings_as_a_comment(
        workspace, tmp_path, monkeypatch):
    modal_fakes.fake_nvidia_smi(tmp_path, monkeypatch, "NVIDIA H100 80GB HBM3, 580.82.07")
    vllm = StandIn([MODEL.name], delay=0.5)
    body = {"model": MODEL.name, "prompt": "Hi", "stream": True}
    with (endpoint(workspace, vllm, keepalive=0.1) as (url, _, _),
          httpx.stream("POST", url + gateway.COMPLETIONS, json=body, timeout=30,
                       headers={"Authorization": f"Bearer {KEY}"}) as reply):
        lines = list(reply.iter_lines())
    assert "server-timing" in reply.headers  # the gateway's own, with the status line
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data:"))
    comments = [line for line in lines[:first_data] if line.startswith(": ")]
    assert comments[0] == ": keep-alive"
    late = [c for c in comments if c != ": keep-alive"]
    assert [c.split(":")[1].strip() for c in late] == [
        "server-timing", "x-vllm-gpu", "server-timing", "server-timing"]
    assert late[1] == ": x-vllm-gpu: NVIDIA H100 80GB HBM3; count=1; driver=580.82.07; vllm=unknown"


def timing(values: list[str]) -> dict[str, float]:
    """Server-Timing entries by name: `engine;dur=12.5` -> {"engine": 12.5}."""
    entries = [e.strip() for v in values for e in v.split(",")]
    return {name: float(dur.removeprefix("dur=")) for name, _, dur in
            (e.partition(";") for e in entries)}


def test_bench_reports_the_hop_apart_from_vllm_and_warns_about_another_gpu(
        workspace, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import deploy

    modal_fakes.fake_nvidia_smi(tmp_path, monkeypatch, "NVIDIA H200, 580.82.07")
    workspace.rpc = 0.02  # each Modal RPC: 20 ms there and back
    vllm = StandIn([MODEL.name], delay=0.05, token_delay=0.005)  # vLLM: 50 ms to first byte
    with endpoint(workspace, vllm) as (url, _, _):
        result = CliRunner().invoke(deploy.cli, [
            "--bench", "h100", "--test-model", MODEL.key, "--base-url", url, "--api-key", KEY,
            "--requests", "6", "--concurrency", "3", "--input-len", "8", "--output-len", "4",
            "--results-dir", str(tmp_path / "results"), "--json"])
        table = CliRunner().invoke(deploy.cli, [
            "--bench", "h100", "--test-model", MODEL.key, "--base-url", url, "--api-key", KEY,
            "--requests", "2", "--concurrency", "1", "--input-len", "8", "--output-len", "4",
            "--results-dir", str(tmp_path / "results")], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert table.exit_code == 0, table.output
    text = " ".join(table.stdout.split())
    rows = [line.split("│")[1].strip() for line in table.stdout.splitlines() if "│" in line]
    assert rows[:6] == ["TTFT", "TPOT", "ITL", "E2EL", "of TTFT: vLLM", "of TTFT: Modal hop"]
    assert "GPU 1x NVIDIA H200, driver 580.82.07, vLLM unknown" in text
    assert "Warning ran on 1x NVIDIA H200, not the H100 of 'h100'" in text
    run = json.loads(result.stdout)["result"]
    assert run["gpu_actual"] == {"name": "NVIDIA H200", "count": 1, "driver": "580.82.07",
                                 "vllm": "unknown"}
    assert run["gpu_warning"].startswith("ran on 1x NVIDIA H200, not the H100 of 'h100'")
    # The first byte: vLLM's 50 ms in the pool; the hop is the spawn RPC (20 ms) and the
    # first chunk's way back (10 + 10 ms), whatever the machine's load adds.
    assert run["engine_ms"]["p50"] >= 50 and run["hop_ms"]["p50"] >= 39
    assert run["hop_ms"]["p99"] >= run["hop_ms"]["p50"]
    assert run["metrics"]["ttft_ms"]["mean"] >= run["engine_ms"]["mean"] + run["hop_ms"]["mean"]


# ## The emulators behave as the SDK's source says (what the tests above rely on)


class Counter:
    """A plain pool class: `count` yields n numbers slowly, `wait` sleeps, `fail` raises."""

    produced: ClassVar[list[int]] = []

    @modal.method()
    async def count(self, n: int):
        for i in range(n):
            Counter.produced.append(i)
            yield i
            await asyncio.sleep(0.01)

    @modal.method()
    async def wait(self, seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "done"

    @modal.method()
    async def fail(self) -> None:
        raise ValueError("the method's own error")


def test_the_sdk_fakes_behave_as_the_sdk(workspace):
    Counter.produced = []
    pool = workspace.pool(Counter)

    async def run():
        obj = pool()
        # A .remote_gen consumer that stops reading does not stop the generator.
        gen = obj.count.remote_gen.aio(50)
        assert [await anext(gen), await anext(gen)] == [0, 1]
        await gen.aclose()
        await asyncio.wait_for(asyncio.shield(pool.inputs[0].result), 10)
        assert len(Counter.produced) == 50
        # A generator cannot be spawned; spawn returns at once, get blocks for the result.
        with pytest.raises(modal.exception.InvalidError, match="Cannot `spawn` a generator"):
            await obj.count.spawn.aio(1)
        call = await obj.wait.spawn.aio(0.3)
        with pytest.raises(TimeoutError):  # Python's, as FunctionCall.get(timeout=) raises
            await call.get.aio(timeout=0.01)
        assert await call.get.aio() == "done"
        # cancel stops the work at the next heartbeat; get then raises RemoteError.
        call = await obj.wait.spawn.aio(30)
        await asyncio.sleep(0.05)
        await call.cancel.aio()
        with pytest.raises(modal.exception.RemoteError):
            await asyncio.wait_for(call.get.aio(), 5)
        # The method's own exception reaches the caller as itself.
        with pytest.raises(ValueError, match="the method's own error"):
            await obj.fail.remote.aio()
        await workspace.shutdown()

    asyncio.run(run())
    assert pool.boots == 1


class BadEnter:
    @modal.enter()
    def start(self) -> None:
        raise RuntimeError("cannot start")

    @modal.method()
    async def wait(self) -> None:
        pass


def test_a_failing_enter_hook_crash_loops_then_fails_the_waiting_inputs(workspace):
    workspace.boot_attempts = 4
    pool = workspace.pool(BadEnter)

    async def run():
        with pytest.raises(RuntimeError, match="cannot start"):
            await pool().wait.remote.aio()

    asyncio.run(run())
    assert pool.boots == 4 and len(pool.boot_errors) == 4  # a new container each time


def test_the_ingress_answers_at_once_when_the_response_starts_in_time(workspace):
    vllm = StandIn([MODEL.name])
    with endpoint(workspace, vllm) as (url, ingress, _):
        assert ask_httpx(url).startswith("This is the stand-in answering")
        assert ingress.handoffs == [] and ingress.result_fetches == []
