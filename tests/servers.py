"""Start servers for tests and benchmarks on free loopback ports, and always stop them."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Self

import uvicorn

HOST = "127.0.0.1"
ROOT_DIR = Path(__file__).resolve().parent.parent


def wait_until(predicate, timeout: float = 10.0) -> bool:
    """Poll until `predicate()` is true; False after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {HOST}:{port} after {timeout:.0f}s")


class ThreadServer:
    """An ASGI app under uvicorn in a daemon thread, on a socket bound before it starts
    (no race for the port). Use as a context manager."""

    def __init__(self, app, **options):
        self.app = app
        self.options = {"log_level": "critical", "access_log": False, "lifespan": "on", **options}
        self.port = 0
        self.server = self.thread = self.sock = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def __enter__(self) -> Self:
        # IPPROTO_TCP, not 0: asyncio only sets TCP_NODELAY on sockets that say so, and
        # without it a reply written in two parts waits ~40 ms for a delayed ACK.
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((HOST, 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, **self.options))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True, name=f"server-{self.port}")
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError("server thread did not start")
            time.sleep(0.005)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


class ProcessServer:
    """A server process on a given port: started, waited for, then terminated (killed if it
    lingers). Use as a context manager."""

    def __init__(self, argv: list[str], port: int, *, env: dict | None = None,
                 timeout: float = 60.0, log=None, cwd=None):
        self.argv, self.port, self.env, self.timeout, self.cwd = argv, port, env, timeout, cwd
        self.log = log if log is not None else subprocess.DEVNULL
        self.proc = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def __enter__(self) -> Self:
        self.proc = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_for_port(self.port, self.timeout, self.proc)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
