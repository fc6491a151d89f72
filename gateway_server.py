"""The local gateway's HTTP server: uvicorn's httptools protocol with limits before auth.

`deploy.py --serve-local` serves the gateway with uvicorn and httptools (its C parser is
what keeps the gateway's added latency under half a millisecond). Neither bounds what a
client may do before a request is complete: httptools gathers a header's bytes in memory
until the header ends (one 128 MiB header cost 20 s of CPU), and uvicorn times nothing out
until a first response (1100 idle sockets under `ulimit -n 1024` locked every client out).
So the protocol below, per connection and before any key is checked:

- bounds the request line and headers together (`max_head_bytes`): 431, then close;
- gives a request `header_timeout` seconds, from the connection's start or the end of the
  previous response, to complete its headers: 408 if some of it came, else a silent close;
- keeps at most `max_idle_connections` connections that have no request in flight (fresh,
  half-sent, or idle keep-alive): past it, the longest-waiting one is closed, so a flood of
  idle sockets cannot use up the process's file descriptors;
- answers what the HTTP parser refuses with an OpenAI-shaped 400, and logs each of these
  refusals as one JSON line like any request (uvicorn's plain-text warnings never print).

Idle keep-alive connections are closed by uvicorn after `keepalive_timeout`. On Modal none
of this applies: the gateway runs inside `modal.asgi_app()`, behind Modal's own web server.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

import config
import gateway

log = logging.getLogger("gateway")


class CannotListenError(config.UserError):
    """--serve-local could not bind its address (in use, not on this machine, no permission)."""

    exit_code = 9


@dataclass(frozen=True)
class Limits:
    max_head_bytes: int = 16 * 1024  # request line + headers; nginx's default is 8 KiB x 4
    header_timeout: float = 10.0  # seconds to complete a request's headers
    keepalive_timeout: float = 5.0  # seconds an idle keep-alive connection stays open
    max_idle_connections: int = 256  # connections with no request in flight


def default_limits() -> Limits:
    """Limits for this process: idle connections at most a quarter of its file descriptors
    (each request in flight holds two: the client's and the upstream's)."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError):
        return Limits()
    if soft == resource.RLIM_INFINITY:
        return Limits()
    return Limits(max_idle_connections=max(8, min(Limits.max_idle_connections, soft // 4)))


def protocol_class(limits: Limits) -> type[HttpToolsProtocol]:
    """A protocol class for one server: the limits, and its own registry of idle connections."""
    return type("GuardedHttpToolsProtocol", (GuardedProtocol,), {"limits": limits, "idle": {}})


class GuardedProtocol(HttpToolsProtocol):
    limits: Limits
    idle: dict  # connections with no request in flight, oldest first (dicts keep order)

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.head = 0  # bytes of the current request's line and headers; None once complete
        self.deadline = None
        self._wait_for_request()

    def connection_lost(self, exc) -> None:
        self.idle.pop(self, None)
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        head = self.head
        if head is not None:
            room = self.limits.max_head_bytes - head
            if len(data) > room:  # only the head's share is fed before the limit is checked
                self._feed(data[:room])
                if self.head is not None and not self.transport.is_closing():
                    return self._refuse(431, "request line and headers larger than "
                                             f"{self.limits.max_head_bytes} bytes")
                data = data[room:]
            else:
                self.head = head + len(data)
        if data and not self.transport.is_closing():
            self._feed(data)

    def _feed(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._refuse(400, f"invalid HTTP request: {exc}")
        except httptools.HttpParserUpgrade:
            pass  # no upgrades here (no websockets): the request is answered as plain HTTP

    def on_headers_complete(self) -> None:
        self.head = None
        self._disarm()
        self.idle.pop(self, None)  # a request in flight: not idle, no deadline
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.head = 0  # what follows is the next request's head

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.cycle.response_complete:
            self._wait_for_request()

    def _wait_for_request(self) -> None:
        """No request in flight: count as idle, and give the next one header_timeout."""
        self._disarm()
        self.deadline = self.loop.call_later(self.limits.header_timeout, self._too_slow)
        idle = self.idle
        idle[self] = None
        if len(idle) > self.limits.max_idle_connections:
            oldest = next(iter(idle))
            idle.pop(oldest)
            oldest._disarm()
            oldest.transport.close()

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _too_slow(self) -> None:
        self.deadline = None
        if self.head:  # part of a request came, not all of its headers
            self._refuse(408, "request headers not received within "
                              f"{self.limits.header_timeout:g} s")
        elif not self.transport.is_closing():
            self.transport.close()  # nothing sent (or the rest of an answered body): just close

    def send_400_response(self, msg: str) -> None:  # uvicorn's own calls, e.g. on upgrade
        self._refuse(400, f"invalid HTTP request: {msg}")

    def _refuse(self, status: int, message: str) -> None:
        """Answer a request the app never saw (OpenAI-shaped), log it, close the connection."""
        self.head = None
        self._disarm()
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:  # else a response is under way
            body = gateway.error_body(status, message)
            self.transport.write(b"".join([
                STATUS_LINE[status], b"content-type: application/json\r\n",
                b"content-length: %d\r\n" % len(body), b"connection: close\r\n\r\n", body]))
        self.transport.close()
        if log.isEnabledFor(logging.INFO):
            log.info(json.dumps({"request_id": os.urandom(8).hex(), "method": None,
                                 "path": None, "model": None, "status": status,
                                 "stream": False, "ms": 0, "error": message}))


# ## Binding: one line and its own exit code when the address cannot be had


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket listening on host:port (port 0: any free one); CannotListenError otherwise."""
    if not 0 <= port <= 65535:
        raise config.UsageError(f"--port {port}: expected 0..65535 (0 picks a free port)")
    where = f"{host}:{port}"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise CannotListenError(f"cannot listen on {where}: unknown host ({exc.strerror})") \
            from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise CannotListenError(f"cannot listen on {where}: {exc.strerror or exc}") from None
    return sock


def bound_port(sock: socket.socket) -> int:
    return sock.getsockname()[1]


# ## Logging: JSON lines only on the gateway's stream


class JsonFormatter(logging.Formatter):
    """Anything uvicorn itself still says (errors in the app, shutdown trouble) as JSON."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"event": "server", "level": record.levelname.lower(),
                "message": record.getMessage()}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def configure_logging(stream) -> None:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger("gateway").addHandler(handler)
    logging.getLogger("gateway").setLevel(logging.INFO)
    logging.getLogger("gateway").propagate = False
    quiet = logging.StreamHandler(stream)
    quiet.setFormatter(JsonFormatter())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [quiet]
        logger.setLevel(logging.ERROR)
        logger.propagate = False
