"""The public gateway: one authenticated OpenAI-compatible endpoint for many models.

A raw ASGI app, Modal-agnostic: the Modal apps mount it, `deploy.py --serve-local`
runs it under uvicorn. It checks the bearer key, allows four routes and nothing
else, routes each request by its `model` field to that model's backend, turns
the legacy `guided_*` fields (silently ignored by vLLM >= 0.12) into
`structured_outputs`, and passes streams through unbuffered.

No web framework: everything here is added to every request, so the hot path
is a dict lookup per step and error bodies are encoded once.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from typing import Protocol
from urllib.parse import urlsplit

import config

log = logging.getLogger("gateway")

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
DEFAULT_MAX_BODY = 32 * 1024 * 1024  # several base64 images
DEFAULT_RETRY_AFTER = 10  # seconds a client should wait for a starting backend
KEEPALIVE = b": keep-alive\n\n"  # an SSE comment: clients skip it, proxies see traffic

ERROR_TYPES = {
    400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
    404: "NotFoundError", 405: "MethodNotAllowedError", 408: "RequestTimeoutError",
    413: "RequestTooLargeError", 422: "UnprocessableEntityError", 429: "RateLimitError",
    500: "InternalServerError", 502: "BadGatewayError", 503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}

# Fields vLLM removed in 0.12 (it now ignores them and answers 200 unconstrained).
LEGACY_CONSTRAINTS = {"guided_json": "json", "guided_regex": "regex",
                      "guided_choice": "choice", "guided_grammar": "grammar"}
LEGACY_OPTIONS = {"guided_whitespace_pattern": "whitespace_pattern"}
LEGACY_DROPPED = ("guided_decoding_backend",)  # the backend is server-wide in vLLM 0.33
LEGACY_FIELDS = frozenset([*LEGACY_CONSTRAINTS, *LEGACY_OPTIONS, *LEGACY_DROPPED])
CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
# vLLM request fields that steer the server rather than one request: KV transfer between
# instances (a connector may dial the host it names) and arguments for server-side plugins.
# Nothing a client of a public endpoint needs; vLLM itself refuses `chat_template`,
# `logits_processors` and `priority` unless the server opts in.
OPERATOR_FIELDS = ("kv_transfer_params", "vllm_xargs")
MAX_N = 128  # completions per request, as OpenAI caps it: one request must not fill a replica
CONSTRAINING_FORMATS = ("json_object", "json_schema", "structural_tag")


class BackendError(Exception):
    """A backend failure the client sees as `status` (502/503/504, or an upstream 4xx)."""

    def __init__(self, status: int, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


class Backend(Protocol):
    """Where a routed request goes. Bodies cross it as bytes, both ways: the gateway
    decides what to forward, and nothing here parses or re-encodes a body it need not.

    `headers` is the response's: a backend may append (name, value) pairs to it, e.g.
    timings or the GPU it ran on; for a stream, before it yields the first chunk.
    """

    async def send(self, model: config.Model, path: str, body: bytes,
                   headers: list[tuple[bytes, bytes]]) -> tuple[int, bytes]:
        """The upstream's status and body (a JSON object); 4xx answers are returned, not raised."""

    def stream(self, model: config.Model, path: str, body: bytes,
               headers: list[tuple[bytes, bytes]]) -> AsyncIterator[bytes]:
        """Raw SSE bytes as they come; BackendError before the first chunk on an error status."""


def api_key_from_env() -> str | None:
    """The bearer key (Modal's secret `vllm-api-key` provides API_KEY)."""
    return os.environ.get("API_KEY") or None


def mask_key(key: str | None) -> str:
    """Enough to recognise a key, never enough to use it."""
    if not key:
        return "(none)"
    return f"{key[:3]}…{key[-4:]}" if len(key) >= 16 else "…" + "*" * 4


def error_body(status: int, message: str, param: str | None = None) -> bytes:
    error = {"message": message, "type": ERROR_TYPES.get(status, "APIError"),
             "param": param, "code": status}
    return json.dumps({"error": error}).encode()


class Reject(Exception):
    """Answer with an OpenAI-shaped error and stop handling the request."""

    def __init__(self, status: int, body: bytes, headers: tuple = ()):
        self.status, self.body, self.headers = status, body, headers


def _reject(status: int, message: str, param: str | None = None, headers: tuple = ()) -> Reject:
    return Reject(status, error_body(status, message, param), headers)


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


# ## Structured outputs: pass the current API through, translate the legacy one


def normalize_structured_outputs(body: dict) -> None:
    """Move guided_* into structured_outputs in place; Reject requests with conflicting constraints."""
    legacy = LEGACY_FIELDS.intersection(body)
    fmt = body.get("response_format")
    so = body.get("structured_outputs")
    if not legacy and so is None:
        return  # the common case: nothing to check beyond what vLLM checks
    kinds = []
    if isinstance(fmt, dict) and fmt.get("type") in CONSTRAINING_FORMATS:
        kinds.append(f"response_format {fmt['type']}")
    if isinstance(so, dict):
        kinds += [f"structured_outputs.{k}" for k in CONSTRAINTS if so.get(k) is not None]
    moved = {}
    for field in sorted(legacy):
        value = body.pop(field)
        if value is None:
            continue
        if field in LEGACY_CONSTRAINTS:
            kinds.append(field)
            moved[LEGACY_CONSTRAINTS[field]] = value
        elif field in LEGACY_OPTIONS:
            moved[LEGACY_OPTIONS[field]] = value
    if len(kinds) > 1:
        raise _reject(400, "conflicting structured-output constraints: " + ", ".join(kinds)
                      + "; use exactly one", "structured_outputs")
    if moved:
        if so is not None and not isinstance(so, dict):
            raise _reject(400, "structured_outputs must be an object", "structured_outputs")
        body["structured_outputs"] = {**(so or {}), **moved}


def refuse_operator_fields(body: dict) -> None:
    """Reject what a public endpoint takes from no client (see OPERATOR_FIELDS, MAX_N)."""
    for field in OPERATOR_FIELDS:
        if field in body:
            raise _reject(400, f"'{field}' is not accepted by this endpoint", field)
    n = body.get("n")
    if type(n) is int and n > MAX_N:
        raise _reject(400, f"'n' must be at most {MAX_N}", "n")


# ## The ASGI app


class _Exchange:
    """One request's response side: status sent, stream state, disconnect watcher, and the
    gateway's own time (Server-Timing `gateway`: all of it but waiting for the backend)."""

    __slots__ = ("done", "gone", "rid", "send", "started", "status", "t0", "waited", "watcher")

    def __init__(self, send, rid: bytes):
        self.send, self.rid = send, rid
        self.status, self.started, self.gone, self.watcher, self.done = 0, False, False, None, False
        self.t0, self.waited = time.perf_counter(), 0.0

    def timing(self) -> tuple[bytes, bytes]:
        return b"server-timing", b"gateway;dur=%.2f" % (
            (time.perf_counter() - self.t0 - self.waited) * 1000)

    async def reply(self, status: int, body: bytes, headers: tuple = ()) -> None:
        self.finish()
        self.status = status
        await self.send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
            (b"x-request-id", self.rid), *headers, self.timing()]})
        await self.send({"type": "http.response.body", "body": body})

    async def start_stream(self, headers=()) -> None:
        self.status, self.started = 200, True
        await self.send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no"),
            (b"x-request-id", self.rid), *headers, self.timing()]})

    async def chunk(self, data: bytes) -> None:
        await self.send({"type": "http.response.body", "body": data, "more_body": True})

    async def end_stream(self, data: bytes = b"") -> None:
        self.finish()
        await self.send({"type": "http.response.body", "body": data})

    def watch(self, receive, handoff_after: float | None = None) -> None:
        """Cancel this request's task (and so its backend call) if the client goes away."""
        self.watcher = asyncio.ensure_future(
            self._watch(receive, asyncio.current_task(), handoff_after))

    async def _watch(self, receive, task, handoff_after) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if self.done:
            return
        if (handoff_after is not None and not self.started
                and time.perf_counter() - self.t0 >= handoff_after):
            return  # Modal's hand-off to its result URL: the answer is still wanted there
        self.gone = True
        task.cancel()

    def finish(self) -> None:
        """Before the last send: a completed response also reads as a disconnect."""
        self.done = True
        if self.watcher is not None:
            self.watcher.cancel()


class Gateway:
    def __init__(self, models, backend, *, api_key, allow_unauthenticated, unavailable,
                 max_body_bytes, keepalive_interval, handoff_after=None):
        if not api_key and not allow_unauthenticated:
            raise config.UsageError(
                "no API key configured: set API_KEY (Modal secret 'vllm-api-key') or "
                "VLLM_API_KEY for --serve-local, or explicitly allow unauthenticated access")
        self.backend = backend
        self.key_digest = hashlib.sha256(api_key.encode()).digest() if api_key else None
        self.max_body = max_body_bytes
        self.keepalive = keepalive_interval
        self.handoff_after = handoff_after
        # Every name a request may use -> (its model's pool, the name vLLM serves it under).
        # A LoRA adapter goes to its base model's pool as itself: `python` or `<base>:python`.
        self.by_name = {alias.lower(): (m, m.name) for m in models for alias in m.aliases}
        for m in models:
            for a in m.adapters:
                self.by_name[a.name.lower()] = (m, a.name)
                self.by_name.update({f"{alias}:{a.name}".lower(): (m, a.name)
                                     for alias in m.aliases})
        self.unavailable = {k.lower(): (k, why) for k, why in (unavailable or {}).items()}
        adapter_names = [a.name for m in models for a in m.adapters]
        self.served = (", ".join(m.name for m in models) or "(none)") + (
            f" (adapters: {', '.join(adapter_names)})" if adapter_names else "")
        self.routes = {CHAT: CHAT, COMPLETIONS: COMPLETIONS}
        created = int(time.time())
        self.models_body = json.dumps({"object": "list", "data": [
            {"id": m.name, "object": "model", "created": created, "owned_by": "modal-vllm",
             "root": m.huggingface_id, "parent": None, "max_model_len": m.max_model_len,
             "aliases": [a for a in m.aliases if a != m.name]}
            for m in models] + [
            {"id": a.name, "object": "model", "created": created, "owned_by": "modal-vllm",
             "root": a.name, "parent": m.name, "max_model_len": m.max_model_len,
             "aliases": [f"{m.key}:{a.name}"]}
            for m in models for a in m.adapters]}).encode()
        self.health_body = json.dumps({"status": "ok", "models": len(models)}).encode()
        self.no_key = error_body(401, "missing API key: send 'Authorization: Bearer <key>'")
        self.bad_header = error_body(401, "malformed Authorization header: expected "
                                          "'Bearer <key>'")
        self.wrong_key = error_body(401, "invalid API key")
        self.not_found = error_body(404, "not found: this endpoint serves /v1/models, "
                                         "/v1/chat/completions and /v1/completions")
        self.too_large = error_body(413, f"request body larger than {max_body_bytes} bytes")

    async def __call__(self, scope, receive, send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self.http(scope, receive, send)
        elif kind == "lifespan":
            await self.lifespan(receive, send)
        elif kind == "websocket":
            await receive()
            await send({"type": "websocket.close", "code": 1008})

    async def lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                close = getattr(self.backend, "aclose", None)
                if close is not None:
                    await close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def http(self, scope, receive, send) -> None:
        t0 = time.perf_counter()
        ex = _Exchange(send, os.urandom(8).hex().encode())
        path = scope["path"]
        model = stream = None
        try:
            model, stream = await self.handle(scope, path, receive, ex)
        except Reject as r:
            await ex.reply(r.status, r.body, r.headers)
        except asyncio.CancelledError:
            if not ex.gone:
                raise
            asyncio.current_task().uncancel()  # the client left; nothing to answer
            ex.status = 499
        finally:
            if ex.watcher is not None:
                ex.watcher.cancel()
            if log.isEnabledFor(logging.INFO):
                log.info(json.dumps({
                    "request_id": ex.rid.decode(), "method": scope["method"],
                    "path": _clip(path, 100), "model": model, "status": ex.status,
                    "stream": bool(stream), "ms": round((time.perf_counter() - t0) * 1000, 2)}))

    async def handle(self, scope, path, receive, ex):
        route = self.routes.get(path)
        method = scope["method"]
        if route is None:
            if path == "/health" and method in ("GET", "HEAD"):
                await ex.reply(200, self.health_body)
                return None, None
            if path == "/v1/models":
                self.authorize(scope)
                if method != "GET":
                    raise _reject(405, "use GET", headers=((b"allow", b"GET"),))
                await ex.reply(200, self.models_body)
                return None, None
            raise Reject(404, self.not_found)
        self.authorize(scope)
        if method != "POST":
            raise _reject(405, "use POST", headers=((b"allow", b"POST"),))
        body = await self.read_body(scope, receive)
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            raise _reject(400, "request body is not valid JSON") from None
        if type(data) is not dict:
            raise _reject(400, "request body must be a JSON object")
        model, data["model"] = self.route_model(data.get("model"))
        refuse_operator_fields(data)
        normalize_structured_outputs(data)
        stream = data.get("stream") is True
        ex.watch(receive, self.handoff_after)
        forward = json.dumps(data).encode()
        if stream:
            await self.relay_stream(ex, model, route, forward)
        else:
            await self.relay(ex, model, route, forward)
        label = model.key if data["model"] == model.name else f"{model.key}:{data['model']}"
        return label, stream

    def authorize(self, scope) -> None:
        if self.key_digest is None:
            return
        found = [v for k, v in scope["headers"] if k == b"authorization"]
        if not found:
            raise Reject(401, self.no_key, ((b"www-authenticate", b"Bearer"),))
        scheme, _, token = found[0].partition(b" ")
        token = token.strip()
        if len(found) > 1 or scheme.lower() != b"bearer" or not token:
            raise Reject(401, self.bad_header, ((b"www-authenticate", b"Bearer"),))
        # Digests of equal length: the comparison reveals neither content nor length.
        if not hmac.compare_digest(hashlib.sha256(token).digest(), self.key_digest):
            raise Reject(401, self.wrong_key,
                         ((b"www-authenticate", b'Bearer error="invalid_token"'),))

    async def read_body(self, scope, receive) -> bytes:
        for k, v in scope["headers"]:
            if k == b"content-length":
                if not v.isdigit():
                    raise _reject(400, "invalid Content-Length")
                if len(v) > 15 or int(v) > self.max_body:  # int() refuses 4300+ digits
                    raise Reject(413, self.too_large)  # refused before reading any of it
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _reject(400, "client disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise Reject(413, self.too_large)
            chunks.append(chunk)
            if not message.get("more_body"):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def route_model(self, name) -> tuple[config.Model, str]:
        if name is None:
            raise _reject(400, f"missing 'model'; served models: {self.served}", "model")
        if not isinstance(name, str):
            raise _reject(400, "'model' must be a string", "model")
        found = self.by_name.get(name.strip().lower())
        if found is not None:
            return found
        known = self.unavailable.get(name.strip().lower())
        if known is not None:
            raise _reject(404, f"model '{known[0]}' is not served by this endpoint: {known[1]}; "
                               f"served models: {self.served}", "model")
        raise _reject(404, f"the model '{_clip(name)}' does not exist; served models: "
                           f"{self.served}", "model")

    async def relay(self, ex: _Exchange, model, path, body: bytes) -> None:
        headers: list[tuple[bytes, bytes]] = []
        called = time.perf_counter()
        try:
            status, raw = await self.backend.send(model, path, body, headers)
        except BackendError as e:
            raise self.backend_reject(e) from None
        except Exception as e:  # noqa: BLE001 - a backend bug still gets an OpenAI-shaped answer
            log.warning("backend %s failed: %s", model.key, type(e).__name__)
            raise _reject(502, f"backend for '{model.name}' failed") from None
        finally:
            ex.waited = time.perf_counter() - called
        if status >= 400:
            status, payload = upstream_error(status, _json_or_none(raw))
            raw = json.dumps(payload).encode()  # ASCII escapes: a lone surrogate cannot fail it
        await ex.reply(status, raw, tuple(headers))

    def backend_reject(self, e: BackendError) -> Reject:
        status, _ = upstream_error(e.status, {})
        retry = e.retry_after if e.retry_after is not None else (
            DEFAULT_RETRY_AFTER if status == 503 else None)
        headers = ((b"retry-after", b"%d" % retry),) if retry is not None else ()
        return _reject(status, e.message if status == e.status else
                       "the backend refused the gateway's credentials", headers=headers)

    async def relay_stream(self, ex: _Exchange, model, path, body: bytes) -> None:
        headers: list[tuple[bytes, bytes]] = []
        called = time.perf_counter()
        chunks = self.backend.stream(model, path, body, headers).__aiter__()
        first = asyncio.ensure_future(chunks.__anext__())
        ended = b"\n"
        try:
            # Hold the status line back briefly so an early upstream error keeps its status;
            # a cold backend gets 200 and comments instead, so nothing cuts an idle request.
            done, _ = await asyncio.wait((first,), timeout=self.keepalive)
            while not done:
                if not ex.started:
                    ex.waited = time.perf_counter() - called
                    await ex.start_stream()
                await ex.chunk(KEEPALIVE)
                done, _ = await asyncio.wait((first,), timeout=self.keepalive)
            try:
                chunk = first.result()
            except StopAsyncIteration:
                raise BackendError(502, f"backend for '{model.name}' sent an empty stream") \
                    from None
            ex.waited = time.perf_counter() - called
            if not ex.started:
                await ex.start_stream(headers)
            else:  # the status line went out with the keep-alives: headers as an SSE comment
                await ex.chunk(late_headers([*headers, ex.timing()]))
            await ex.chunk(chunk)
            ended = chunk[-1:]
            async for chunk in chunks:
                await ex.chunk(chunk)
                ended = chunk[-1:]
            await ex.end_stream()
        except BackendError as e:
            if not ex.started:
                raise self.backend_reject(e) from None
            await self.stream_error(ex, ended, e.status, e.message)
        except Exception as e:  # noqa: BLE001 - never a silent, truncated 200
            log.warning("stream from %s failed: %s", model.key, type(e).__name__)
            if not ex.started:
                raise _reject(502, f"backend for '{model.name}' failed") from None
            await self.stream_error(ex, ended, 502, f"backend for '{model.name}' failed")
        finally:
            if not first.done():
                first.cancel()
                await asyncio.gather(first, return_exceptions=True)
            close = getattr(chunks, "aclose", None)
            if close is not None:
                await close()

    async def stream_error(self, ex: _Exchange, ended: bytes, status: int, message: str):
        lead = b"" if ended == b"\n" else b"\n\n"  # a cut-off event must not swallow ours
        body = json.loads(error_body(status, message))
        ex.status = status
        await ex.end_stream(lead + b"data: " + json.dumps(body).encode() + b"\n\n")


def late_headers(headers) -> bytes:
    """Response headers that came after the status line, as SSE comment lines (clients skip
    them): `: server-timing: pool;dur=183004.2`."""
    return b"".join(b": %s: %s\n" % (k, v) for k, v in headers) + b"\n"


def _json_or_none(raw: bytes):
    try:
        return json.loads(raw)
    except ValueError:
        return None


def upstream_error(status: int, payload) -> tuple[int, dict]:
    """Any upstream error as an OpenAI-shaped body; a backend's own 401 is our fault, not the client's."""
    if status in (401, 403):
        return 502, json.loads(error_body(502, "the backend refused the gateway's credentials"))
    err = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        return status, {"error": {"message": err["message"],
                                  "type": err.get("type") or ERROR_TYPES.get(status, "APIError"),
                                  "param": err.get("param"), "code": err.get("code") or status}}
    message = err if isinstance(err, str) else f"backend answered HTTP {status}"
    return status, json.loads(error_body(status, message))


def build_app(models: list[config.Model], backend: Backend, *, api_key: str | None,
              allow_unauthenticated: bool = False, unavailable: dict[str, str] | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY, keepalive_interval: float = 10.0,
              handoff_after: float | None = None):
    """The ASGI app. `unavailable`: names known but not served here (any alias) -> why.
    `handoff_after`: seconds after which a disconnect of a non-streamed request is Modal's
    303 hand-off to its result URL, not a client that left (None: every disconnect is one)."""
    return Gateway(models, backend, api_key=api_key,
                   allow_unauthenticated=allow_unauthenticated, unavailable=unavailable,
                   max_body_bytes=max_body_bytes, keepalive_interval=keepalive_interval,
                   handoff_after=handoff_after)


# ## The HTTP backend: OpenAI-compatible servers at known base URLs


class HTTPBackend:
    """Forwards to `base_urls[model.key]` over pooled keep-alive connections (aiohttp:
    it measured about twice as fast as httpx per request here)."""

    def __init__(self, base_urls: dict[str, str], *, api_key: str | None = None,
                 timeout: float = 3600.0, connect_timeout: float = 10.0):
        import aiohttp  # here, not per request: importing it takes a few hundred ms

        self.aiohttp = aiohttp
        self.urls = {}
        for key, base in base_urls.items():
            base = base.rstrip("/").removesuffix("/v1")
            self.urls[key] = {CHAT: base + CHAT, COMPLETIONS: base + COMPLETIONS}
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self.session = None

    def _session(self):
        aiohttp = self.aiohttp
        if self.session is None:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
                timeout=aiohttp.ClientTimeout(total=None, connect=self.connect_timeout,
                                              sock_read=self.timeout),
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=("User-Agent", "Accept-Encoding"))
        return self.session

    def _url(self, model: config.Model, path: str) -> str:
        urls = self.urls.get(model.key)
        if urls is None:
            raise BackendError(502, f"no backend configured for '{model.name}'")
        return urls[path]

    async def _post(self, model, path, body: bytes):
        aiohttp = self.aiohttp
        try:
            return await self._session().post(self._url(model, path), headers=self.headers,
                                               data=body)
        except TimeoutError:
            raise BackendError(504, f"backend for '{model.name}' did not answer in time") \
                from None
        except aiohttp.ClientError:
            raise BackendError(502, f"backend for '{model.name}' is unreachable") from None

    async def send(self, model: config.Model, path: str, body: bytes,
                   headers: list | None = None) -> tuple[int, bytes]:
        aiohttp = self.aiohttp
        resp = await self._post(model, path, body)
        try:
            raw = await resp.read()
        except TimeoutError:
            raise BackendError(504, f"backend for '{model.name}' did not answer in time") \
                from None
        except aiohttp.ClientError:
            raise BackendError(502, f"backend for '{model.name}' dropped the connection") \
                from None
        finally:
            resp.close() if not resp.content.is_eof() else resp.release()
        if resp.status >= 500:
            raise _status_error(resp.status, raw, resp.headers.get("Retry-After"), model)
        # An object's first byte, not a full parse: the body is forwarded as it came.
        if resp.status < 400 and raw.lstrip()[:1] != b"{":
            raise BackendError(502, f"backend for '{model.name}' sent a response that is not "
                                    "a JSON object")
        return resp.status, raw

    async def stream(self, model: config.Model, path: str, body: bytes,
                     headers: list | None = None) -> AsyncIterator[bytes]:
        aiohttp = self.aiohttp
        resp = await self._post(model, path, body)
        complete = False
        try:
            if resp.status >= 400:
                raise _status_error(resp.status, await resp.read(),
                                    resp.headers.get("Retry-After"), model)
            try:
                async for chunk in resp.content.iter_any():
                    yield chunk
            except TimeoutError:
                raise BackendError(504, f"backend for '{model.name}' stopped sending") from None
            except aiohttp.ClientError:
                raise BackendError(502, f"backend for '{model.name}' broke off the stream") \
                    from None
            complete = True
        finally:
            # Closing (not releasing) an unfinished response drops the connection, which is
            # how vLLM learns to abort the generation.
            resp.release() if complete else resp.close()

    async def aclose(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None


def _status_error(status: int, raw: bytes, retry_after: str | None, model) -> BackendError:
    _, shaped = upstream_error(status, _json_or_none(raw))
    message = _clip(shaped["error"]["message"], 500)
    if status == 503:
        retry = int(retry_after) if retry_after and retry_after.isdigit() else DEFAULT_RETRY_AFTER
        return BackendError(503, f"backend for '{model.name}' is starting: {message}", retry)
    if status >= 500:
        return BackendError(504 if status == 504 else 502,
                            f"backend for '{model.name}' failed (HTTP {status}): {message}")
    return BackendError(status, message)


# ## Running it locally in front of servers the user already runs


def parse_upstreams(matrix: config.Matrix, upstreams: list[str]) -> dict[str, str]:
    """'MODEL=URL' routes one model; a bare 'URL' every model not named otherwise."""
    if not upstreams:
        raise config.UsageError("--serve-local needs --upstream MODEL=URL (repeatable) or "
                                "--upstream URL for every model")
    default, named = None, {}
    for item in upstreams:
        name, sep, url = item.partition("=")
        if not sep or "://" in name:
            name, url = "", item
        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise config.UsageError(f"--upstream '{item}': expected an http(s):// URL")
        if not name:
            if default is not None:
                raise config.UsageError("only one --upstream may be a bare URL")
            default = url.strip()
            continue
        model = matrix.resolve_model(name)
        if model.key in named:
            raise config.UsageError(f"--upstream names '{model.key}' twice")
        named[model.key] = url.strip()
    return {key: named.get(key, default) for key in matrix.models
            if named.get(key, default) is not None}


def serve_local(matrix: config.Matrix, upstreams: list[str], *, host: str = "127.0.0.1",
                port: int = 8080, api_key: str | None,
                allow_unauthenticated: bool = False) -> None:
    """Run the gateway under uvicorn in front of OpenAI-compatible servers; blocks."""
    import uvicorn

    urls = parse_upstreams(matrix, upstreams)
    if not api_key and not allow_unauthenticated:
        raise config.UsageError("no API key: set VLLM_API_KEY, or pass --allow-unauthenticated "
                                "to serve without one")
    served = [matrix.models[key] for key in urls]
    unavailable = {alias: "no --upstream was given for it"
                   for m in matrix.models.values() if m.key not in urls for alias in m.aliases}
    backend = HTTPBackend(urls, api_key=os.environ.get("VLLM_UPSTREAM_API_KEY") or None)
    app = build_app(served, backend, api_key=api_key,
                    allow_unauthenticated=allow_unauthenticated, unavailable=unavailable)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    say = log.warning
    say(f"gateway on http://{host}:{port}/v1  key {mask_key(api_key)}")
    for key, url in urls.items():
        say(f"  {matrix.models[key].name} ({key}) -> {url}")
    if not api_key:
        say("WARNING: no API key: anyone who can reach this port can use it")
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False,
                server_header=False, date_header=False, lifespan="on")
