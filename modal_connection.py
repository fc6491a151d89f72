"""Connecting to Modal without a silent minute.

The Modal SDK opens its one connection to Modal's server on the first call, and when
that fails it retries for up to a minute without a word: `create_channel_with_fallbacks`
in modal/_utils/grpc_utils.py (SDK 1.6.4) is decorated `@retry(n_attempts=18,
base_delay=0.1, max_delay=5.0, attempt_timeout=10.0, total_timeout=63.0)` and retries
every exception alike, a name that does not resolve included; `_Client._open`
(modal/client.py) runs it, from `Client.from_env()`. Measured here with a token and no
network: 57 s of nothing, then "Could not connect to the Modal server."

`open_client` runs that call in a daemon thread. If it has not returned within
QUIET_S, it says what it waits for (a spinner on a terminal, a line on stderr
otherwise) and probes each server itself: a name that does not resolve, a refused
connection or a network that is unreachable will not mend within the SDK's minute, so
once every server fails that way it gives up at once (`Hopeless`). Anything else (a
connection that times out, a server that accepts but does not answer) is left to the
SDK's own retries, with the last reason on screen. Behind a proxy (the SDK honours
HTTPS_PROXY and friends) the servers are not probed: only the proxy can tell.

No modal import here: the caller passes the call and the server URLs.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from contextlib import nullcontext
from urllib.parse import urlsplit

QUIET_S = 1.0  # seconds: a working network connects well within (0.1 to 0.5 s seen)
PROBE_TIMEOUT_S = 5.0  # seconds for one TCP connect of a probe (the SDK allows 10 per try)
PROBE_EVERY_S = 5.0  # seconds between probes while the SDK keeps retrying
SDK_RETRY_S = 63  # the SDK's own total_timeout (see above), said while waiting


class Hopeless(Exception):
    """Every server of Modal failed in a way no retry within a minute mends."""


class _Background:
    """A call in a daemon thread: a process that gives up must not wait for it at exit."""

    def __init__(self, call: Callable[[], object]):
        self.done = threading.Event()
        self.value = self.error = None

        def run():
            try:
                self.value = call()
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                self.error = exc
            finally:
                self.done.set()

        threading.Thread(target=run, daemon=True, name="modal-connect").start()

    def result(self):
        if self.error is not None:
            raise self.error
        return self.value


def servers(server_url: str) -> list[tuple[str, int]]:
    """(host, port) of each of the comma-separated URLs the SDK tries."""
    found = []
    for url in server_url.split(","):
        parts = urlsplit(url.strip())
        if parts.hostname:
            found.append((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)))
    return found


def proxied(host: str) -> bool:
    """Would the SDK connect through a proxy (modal/_utils/proxy_support.get_proxy_url)?"""
    if os.environ.get("MODAL_DISABLE_API_PROXY", "").lower() in ("1", "true", "yes"):
        return False
    return bool(urllib.request.getproxies()) and not urllib.request.proxy_bypass(host)


def probe(host: str, port: int) -> tuple[bool, str]:
    """(hopeless, reason): can a TCP connection to the server be opened, and if not, is that
    something retrying for a minute would mend?"""
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return True, f"{host} does not resolve ({exc.strerror})"
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            pass
    except ConnectionRefusedError:
        return True, f"{host}:{port} refused the connection"
    except TimeoutError:
        return False, f"{host}:{port} did not answer within {PROBE_TIMEOUT_S:g} s"
    except OSError as exc:
        if exc.errno == errno.ENETUNREACH:
            return True, f"the network is unreachable (no route to {host})"
        return False, f"{host}:{port}: {exc.strerror or exc}"
    return False, f"{host}:{port} accepts connections, the SDK is still connecting"


def _probe_all(targets: list[tuple[str, int]]) -> tuple[bool, str]:
    results = [probe(host, port) for host, port in targets]
    return all(hopeless for hopeless, _ in results), "; ".join(r for _, r in results)


def open_client(call: Callable[[], object], server_url: str, *, console=None):
    """`call()` (the SDK opening its client), saying what it waits for after QUIET_S and
    raising Hopeless as soon as every server is known to be out of reach."""
    opening = _Background(call)
    if opening.done.wait(QUIET_S):
        return opening.result()
    from rich.console import Console
    from rich.markup import escape

    console = console or Console(stderr=True, highlight=False, emoji=False)
    targets = servers(server_url)
    where = ", ".join(f"{h}:{p}" for h, p in targets) or server_url
    started = time.monotonic()
    via_proxy = any(proxied(h) for h, _ in targets)
    reason = first = "through a proxy" if via_proxy else "no answer yet"
    said = None

    def say(reason: str) -> None:
        nonlocal said
        text = (f"Connecting to Modal ({where}): {reason}; the SDK retries for up to "
                f"{SDK_RETRY_S} s")
        if console.is_terminal:
            status.update(f"{escape(text)} ({time.monotonic() - started:.0f} s)")
        elif reason != said and (reason != first or time.monotonic() - started > QUIET_S):
            # Piped: a line per new reason, not per second; none before the first probe's
            # answer (about a second) unless it is slow to come.
            console.print(escape(text), soft_wrap=True)
            said = reason

    with console.status("") if console.is_terminal else nullcontext() as status:
        say(reason)
        while not opening.done.is_set():
            if not via_proxy:
                probing = _Background(lambda: _probe_all(targets))
                while not (opening.done.is_set() or probing.done.wait(0.5)):
                    say(reason)
                if not opening.done.is_set():
                    hopeless, reason = probing.result()
                    if hopeless:
                        raise Hopeless(reason)
            next_probe = time.monotonic() + PROBE_EVERY_S
            while time.monotonic() < next_probe and not opening.done.wait(0.5):
                say(reason)
    return opening.result()

