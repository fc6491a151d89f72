"""The local gateway's server: limits before auth (431, header deadline, idle connections),
parser refusals as OpenAI-shaped JSON with one log line, binding and its exit codes, and a
bare --upstream URL serving only what the upstream lists. Limits are small and deadlines
short here, so each attack is seen at once; the assertions are bounds, not timings."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
from servers import HOST, ROOT_DIR, ThreadServer, free_port, wait_until
from standin import StandIn

import gateway
import gateway_server

KEY = "sk-server-test-" + "k" * 16
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMITS = gateway_server.Limits(max_head_bytes=2048, header_timeout=0.5, keepalive_timeout=0.5,
                               max_idle_connections=8)


@pytest.fixture(scope="module")
def guarded(matrix):
    """The gateway under the guarded protocol with small limits, in front of a stand-in."""
    with ThreadServer(StandIn(["google/gemma-3-12b-it"])) as up:
        app = gateway.build_app([matrix.models["gemma-3-12b"]],
                                gateway.HTTPBackend({"gemma-3-12b": up.url}), api_key=KEY)
        with ThreadServer(app, http=gateway_server.protocol_class(LIMITS), ws="none",
                          timeout_keep_alive=LIMITS.keepalive_timeout) as gw:
            yield gw


def connect(server) -> socket.socket:
    s = socket.create_connection((HOST, server.port), timeout=10)
    return s


def read_all(s: socket.socket) -> bytes:
    """Everything until the server closes the connection."""
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def status_and_body(reply: bytes) -> tuple[int, dict]:
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


def honest_request(server) -> int:
    return httpx.get(server.url + "/v1/models", headers=AUTH, timeout=10).status_code


# ## Request line and headers


def test_headers_past_the_limit_are_431_before_they_end(guarded, caplog):
    caplog.set_level(logging.INFO, logger="gateway")
    with connect(guarded) as s:
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4096)  # never ends
        status, body = status_and_body(read_all(s))
    assert status == 431 and body["error"]["code"] == 431
    assert set(body["error"]) == {"message", "type", "param", "code"}
    with connect(guarded) as s:  # many small headers count together
        s.sendall(b"GET /health HTTP/1.1\r\n" + b"X-A: b\r\n" * 400 + b"\r\n")
        assert status_and_body(read_all(s))[0] == 431
    with connect(guarded) as s:  # a request line alone
        s.sendall(b"GET /" + b"a" * 3000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_and_body(read_all(s))[0] == 431
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway"]
    assert [line["status"] for line in lines].count(431) == 3
    assert honest_request(guarded) == 200


def test_headers_within_the_limit_and_a_body_in_the_same_packet_pass(guarded):
    body = json.dumps({"model": "gemma-3-12b", "prompt": "x" * 8000, "max_tokens": 1}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nX-Pad: {'p' * 1500}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    assert len(head) < LIMITS.max_head_bytes < len(head + body)
    with connect(guarded) as s:
        s.sendall(head + body)
        assert read_all(s).startswith(b"HTTP/1.1 200")


def test_what_the_parser_refuses_is_an_openai_shaped_400_with_one_log_line(guarded, caplog):
    caplog.set_level(logging.INFO, logger="gateway")
    for bad in (b"GET / HTTP/1.1\r\nHo st: x\r\n\r\n", b"BREW /pot HTCPCP/1.0\r\n\r\n",
                (b"POST /v1/completions HTTP/1.1\r\nContent-Length: 1\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")):
        with connect(guarded) as s:
            s.sendall(bad)
            status, body = status_and_body(read_all(s))
        assert status == 400 and body["error"]["type"] == "BadRequestError", bad
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway"]
    assert [line["status"] for line in lines] == [400, 400, 400]
    assert all(line["error"].startswith("invalid HTTP request") for line in lines)
    assert not [r for r in caplog.records if r.name.startswith("uvicorn")]


# ## Deadlines and idle connections


def test_headers_must_complete_within_the_deadline_even_when_trickled(guarded):
    with connect(guarded) as s:
        started = time.monotonic()
        s.sendall(b"GET /v1/models HTTP/1.1\r\n")
        s.settimeout(0.1)
        reply = b""
        for _ in range(100):  # a byte every 0.1 s: activity must not extend the deadline
            try:
                s.sendall(b"X")
                reply += s.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if reply:
                break
        assert time.monotonic() - started < 8
    assert reply.startswith(b"HTTP/1.1 408")


def test_a_silent_connection_is_closed_without_an_answer(guarded):
    with connect(guarded) as s:
        assert read_all(s) == b""  # closed after header_timeout, nothing written


def test_a_body_trickled_after_the_answer_does_not_hold_the_connection(guarded):
    with connect(guarded) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        s.settimeout(0.1)
        reply = b""
        for _ in range(100):  # unauthenticated: answered 401 at once; the body trickles on
            try:
                s.sendall(b"x")
                chunk = s.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not chunk:
                break
            reply += chunk
        else:
            pytest.fail("the connection stayed open")
    assert reply.startswith(b"HTTP/1.1 401")


def test_idle_keepalive_connections_are_closed(guarded):
    with connect(guarded) as s:
        s.sendall(f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\r\n"
                  .encode())
        assert read_all(s).startswith(b"HTTP/1.1 200")  # then closed when idle


def test_a_flood_of_idle_sockets_does_not_lock_honest_clients_out(guarded):
    flood = [connect(guarded) for _ in range(4 * LIMITS.max_idle_connections)]
    try:
        assert honest_request(guarded) == 200
        for s in flood:
            s.settimeout(0.05)

        def still_open(s) -> bool:
            try:
                return s.recv(1) != b""
            except TimeoutError:
                return True

        assert wait_until(lambda: sum(map(still_open, flood)) <= LIMITS.max_idle_connections)
    finally:
        for s in flood:
            s.close()


def test_the_flood_under_a_low_file_limit(tmp_path):
    """The issue's attack, scaled: 300 idle sockets against a gateway process limited to 256
    file descriptors; an honest client is still answered while they stay open."""
    script = tmp_path / "limited.py"
    script.write_text(
        "import resource, sys, runpy\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))\n"
        "sys.argv = ['deploy.py', *sys.argv[1:]]\n"
        f"sys.path.insert(0, {str(ROOT_DIR)!r})\n"
        f"runpy.run_path({str(ROOT_DIR / 'deploy.py')!r}, run_name='__main__')\n")
    port = free_port()
    env = {**os.environ, "VLLM_API_KEY": KEY}
    with ThreadServer(StandIn(["google/gemma-3-12b-it"])) as up:
        proc = subprocess.Popen([sys.executable, str(script), "--serve-local", "--port",
                                 str(port), "--upstream", f"gemma-3-12b={up.url}"],
                                cwd=ROOT_DIR, env=env, stderr=subprocess.DEVNULL)
        flood = []
        try:
            assert wait_until(lambda: _answers(port), timeout=30)
            for _ in range(300):
                flood.append(socket.create_connection((HOST, port), timeout=5))
            reply = httpx.post(f"http://{HOST}:{port}/v1/completions", headers=AUTH, timeout=10,
                               json={"model": "gemma-3-12b", "prompt": "x", "max_tokens": 1})
            assert reply.status_code == 200
        finally:
            for s in flood:
                s.close()
            proc.terminate()
            proc.wait(timeout=10)


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://{HOST}:{port}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


# ## --serve-local: what it binds, or why not


def serve_local(*args, env=None, timeout=30):
    return subprocess.run([sys.executable, "deploy.py", "--serve-local", *args], cwd=ROOT_DIR,
                          env={**os.environ, "VLLM_API_KEY": KEY, **(env or {})},
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.parametrize("port", ["65536", "70000", "-1"])
def test_a_port_out_of_range_is_a_usage_error(port):
    result = serve_local("--port", port, "--upstream", "http://127.0.0.1:9")
    assert result.returncode == 2, result.stderr
    assert f"--port {port}: expected 0..65535" in result.stderr
    assert "gateway on" not in result.stderr


def test_a_port_in_use_is_one_line_and_exit_9():
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve_local("--port", str(port), "--upstream", "http://127.0.0.1:9")
    assert result.returncode == 9, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"Error: cannot listen on 127.0.0.1:{port}: Address already in use"]


def test_a_host_this_machine_does_not_have_is_exit_9():
    result = serve_local("--host", "192.0.2.1", "--port", "8080",  # TEST-NET-1: never local
                         "--upstream", "http://127.0.0.1:9")
    assert result.returncode == 9, result.stderr
    assert "cannot listen on 192.0.2.1:8080: Cannot assign requested address" in result.stderr
    assert "gateway on" not in result.stderr


def test_port_0_announces_the_port_it_listens_on(tmp_path):
    log = (tmp_path / "gw.log").open("w+")
    proc = subprocess.Popen([sys.executable, "deploy.py", "--serve-local", "--port", "0",
                             "--upstream", "gemma-3-12b=http://127.0.0.1:9"], cwd=ROOT_DIR,
                            env={**os.environ, "VLLM_API_KEY": KEY}, stderr=log)
    try:
        assert wait_until(lambda: "gateway on" in (tmp_path / "gw.log").read_text(), 30)
        banner = (tmp_path / "gw.log").read_text().splitlines()[0]
        port = int(banner.split("http://127.0.0.1:")[1].split("/")[0])
        assert port > 0 and wait_until(lambda: _answers(port), timeout=30)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# ## A bare --upstream URL serves what the upstream lists


def test_a_bare_upstream_serves_and_lists_only_what_it_lists(tmp_path):
    port = free_port()
    upstream = StandIn(["google/gemma-3-27b-it"])
    log = (tmp_path / "gw.log").open("w+")
    with ThreadServer(upstream) as up:
        proc = subprocess.Popen([sys.executable, "deploy.py", "--serve-local", "--port",
                                 str(port), "--upstream", up.url], cwd=ROOT_DIR,
                                env={**os.environ, "VLLM_API_KEY": KEY}, stderr=log)
        try:
            assert wait_until(lambda: _answers(port), timeout=30)
            url = f"http://{HOST}:{port}"
            listed = httpx.get(url + "/v1/models", headers=AUTH).json()["data"]
            assert [m["id"] for m in listed] == ["google/gemma-3-27b-it"]
            missing = httpx.post(url + "/v1/completions", headers=AUTH,
                                 json={"model": "gemma-3-12b", "prompt": "x"})
            assert missing.status_code == 404
            assert "does not list it at /v1/models" in missing.json()["error"]["message"]
            assert httpx.post(url + "/v1/completions", headers=AUTH, json={
                "model": "gemma-3-27b", "prompt": "x", "max_tokens": 1}).status_code == 200
            # The upstream starts serving another model: the next request for it finds it.
            upstream.names.append("google/gemma-3-12b-it")
            assert wait_until(lambda: httpx.post(url + "/v1/completions", headers=AUTH, json={
                "model": "gemma-3-12b", "prompt": "x", "max_tokens": 1}).status_code == 200)
            assert len(httpx.get(url + "/v1/models", headers=AUTH).json()["data"]) == 2
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    log.seek(0)
    assert "serves: google/gemma-3-27b-it (gemma-3-27b)" in log.read()


def test_an_upstream_that_never_answers_its_listing_does_not_hold_the_gateway(tmp_path):
    """A bare upstream that takes the connection and never answers /v1/models (a hung
    server): the gateway printed its banner, then answered nothing, /health included, for
    the upstream read timeout (an hour), stuck asking at start-up."""
    port = free_port()
    log = (tmp_path / "gw.log").open("w+")
    with socket.create_server((HOST, 0)) as hung:  # the kernel accepts; nothing answers
        proc = subprocess.Popen([sys.executable, "deploy.py", "--serve-local", "--port",
                                 str(port), "--upstream", f"http://{HOST}:{hung.getsockname()[1]}"],
                                cwd=ROOT_DIR, env={**os.environ, "VLLM_API_KEY": KEY}, stderr=log)
        try:
            assert wait_until(lambda: _answers(port), timeout=60)
            missing = httpx.post(f"http://{HOST}:{port}/v1/completions", headers=AUTH,
                                 json={"model": "gemma-3-12b", "prompt": "x"}, timeout=60)
            assert missing.status_code == 404
            assert "has not answered /v1/models yet" in missing.json()["error"]["message"]
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def test_a_listing_nested_past_json_limits_is_no_listing_and_rereading_goes_on(matrix):
    """A bare upstream answering /v1/models with JSON nested 100k deep: json.loads raises
    RecursionError, which ended the 30 s re-reading for good."""
    nested = b"[" * 100_000 + b"]" * 100_000

    async def upstream(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": nested})

    calls = []

    class Discovery(gateway.UpstreamDiscovery):
        async def __call__(self, force=False):
            calls.append(force)
            if len(calls) == 2:
                raise RuntimeError("a bug in one round")
            return await super().__call__(force)

    with ThreadServer(upstream) as server:
        async def run():
            backend = gateway.HTTPBackend({})
            try:
                assert await gateway.upstream_model_ids(backend, server.url) is None
                discovery = Discovery(matrix, {}, server.url, backend, interval=0.05)
                discovery.gateway = gateway.build_app([], backend, api_key=KEY)
                task = asyncio.ensure_future(discovery.keep_asking())
                await asyncio.sleep(0.5)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            finally:
                await backend.aclose()

        asyncio.run(run())
    assert len(calls) >= 3  # the round that raised did not end the re-reading


def test_named_upstreams_are_served_whatever_a_bare_one_lists(matrix):
    discovery = gateway.UpstreamDiscovery(matrix, {"gemma-3-12b": "http://a"}, "http://b",
                                          backend=None)
    served, unavailable = discovery.tables({"google/gemma-3-27b-it"})
    assert [m.key for m in served] == ["gemma-3-12b", "gemma-3-27b"]
    assert "does not list it" in unavailable["qwen3-vl-30b"]
