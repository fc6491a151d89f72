"""No silent minute: connecting to Modal says what it waits for and gives up at once when no
retry can help. `modal_connection.open_client` with stand-ins for the SDK's call (a call
that blocks as the SDK does while it retries, modal/_utils/grpc_utils.py), then the real
CLI in a subprocess with a fake token, its SDK pointed at a closed loopback port or at a
name that does not resolve (.invalid never does, RFC 6761)."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from rich.console import Console
from servers import ROOT_DIR, free_port

import modal_connection

SDK_SILENT_MINUTE = 58  # seconds the SDK took here, silently, before this fix


class Retrying:
    """The SDK's `Client.from_env()` while it retries: blocks until released, then returns
    (or raises) what it is given."""

    def __init__(self, after: float = 60.0, result="client", error: Exception | None = None):
        self.after, self.result, self.error = after, result, error
        self.released = threading.Event()

    def __call__(self):
        self.released.wait(self.after)
        if self.error is not None:
            raise self.error
        return self.result


def piped() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=False, highlight=False, width=200), out


@pytest.fixture
def listening():
    """A server that accepts connections (the kernel completes the handshake) but never
    answers: what the SDK sees when TCP works and TLS or HTTP/2 does not."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield sock.getsockname()[1]
    sock.close()


def test_a_quick_connection_says_nothing():
    console, out = piped()
    started = time.monotonic()
    assert modal_connection.open_client(lambda: "client", "https://modal-vllm.invalid",
                                        console=console) == "client"
    assert time.monotonic() - started < 1 and out.getvalue() == ""


def test_refused_everywhere_gives_up_at_once():
    closed, closed_too = free_port(), free_port()
    console, out = piped()
    call = Retrying()
    started = time.monotonic()
    with pytest.raises(modal_connection.Hopeless) as caught:
        modal_connection.open_client(
            call, f"http://127.0.0.1:{closed},https://127.0.0.1:{closed_too}", console=console)
    call.released.set()
    assert time.monotonic() - started < 10
    assert str(caught.value) == (f"127.0.0.1:{closed} refused the connection; "
                                 f"127.0.0.1:{closed_too} refused the connection")
    assert out.getvalue() == ""  # the answer came at once: no line before the error


def test_a_name_that_does_not_resolve_gives_up_at_once():
    call = Retrying()
    with pytest.raises(modal_connection.Hopeless,
                       match=r"^modal-vllm-test\.invalid does not resolve \("):
        modal_connection.open_client(call, "https://modal-vllm-test.invalid",
                                     console=piped()[0])
    call.released.set()


def test_one_server_that_accepts_keeps_the_wait_going_and_says_so(listening):
    """The SDK's fallback URL is reachable: its retries may still succeed, so they are waited
    for; piped, one line says why, not one per second."""
    closed = free_port()
    console, out = piped()
    call = Retrying(after=2.5)
    assert modal_connection.open_client(
        call, f"http://127.0.0.1:{closed},http://127.0.0.1:{listening}",
        console=console) == "client"
    assert out.getvalue() == (
        f"Connecting to Modal (127.0.0.1:{closed}, 127.0.0.1:{listening}): 127.0.0.1:{closed} "
        f"refused the connection; 127.0.0.1:{listening} accepts connections, the SDK is still "
        "connecting; the SDK retries for up to 63 s\n")


def test_the_sdks_own_failure_is_raised_when_it_gives_up(listening):
    call = Retrying(after=1.5, error=ConnectionError("Could not connect to the Modal server."))
    with pytest.raises(ConnectionError, match="Could not connect"):
        modal_connection.open_client(call, f"http://127.0.0.1:{listening}", console=piped()[0])


def test_behind_a_proxy_only_the_sdk_can_tell(monkeypatch):
    """The SDK connects through HTTPS_PROXY (modal/_utils/proxy_support.py): a refused direct
    connection says nothing then, so nothing is probed and the SDK is waited for."""
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{free_port()}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    console, out = piped()
    call = Retrying(after=2.5)
    assert modal_connection.open_client(call, f"https://127.0.0.1:{free_port()}",
                                        console=console) == "client"
    assert "through a proxy" in out.getvalue()


def test_on_a_terminal_a_spinner_says_what_it_waits_for(listening):
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=200)
    call = Retrying(after=2.5)
    modal_connection.open_client(call, f"http://127.0.0.1:{listening}", console=console)
    assert f"Connecting to Modal (127.0.0.1:{listening}): 127.0.0.1:{listening} accepts" \
        in out.getvalue()


# ## The CLI, in a subprocess: exit 5 and one line, long before the SDK's silent minute


@pytest.mark.parametrize("args", [["--url", "h100"], ["--status"], ["--stop", "h100", "--yes"],
                                  ["--gpu", "h100"], ["--warm", "h100", "--api-key", "k"]],
                         ids=" ".join)
@pytest.mark.parametrize("server", ["closed port", "no such name"])
def test_a_modal_command_without_a_way_to_modal_fails_fast(isolated_home, args, server):
    url = (f"http://127.0.0.1:{free_port()}" if server == "closed port"
           else "https://api.modal-vllm-test.invalid")
    env = {**os.environ, "HOME": str(isolated_home), "MODAL_TOKEN_ID": "ak-testtokenid0001",
           "MODAL_TOKEN_SECRET": "as-testtokensecret0002", "MODAL_SERVER_URL": url}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "deploy.py", *args], env=env, cwd=ROOT_DIR,
                          capture_output=True, text=True, timeout=120, check=False)
    took = time.monotonic() - started
    assert proc.returncode == 5, proc.stderr
    assert took < SDK_SILENT_MINUTE / 3, took  # about 1.5 s here; a loaded machine is slower
    reason = (f"127.0.0.1:{url.rsplit(':', 1)[1]} refused the connection"
              if server == "closed port" else "api.modal-vllm-test.invalid does not resolve (")
    assert proc.stderr.startswith(f"Error: cannot reach Modal (set by MODAL_SERVER_URL): "
                                  f"{reason}"), proc.stderr
    assert proc.stderr.endswith("; check the network connection and retry\n"), proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and proc.stdout == ""
