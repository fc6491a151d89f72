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
import re
import sys
import time
from collections.abc import AsyncIterator
from itertools import accumulate
from typing import Protocol
from urllib.parse import urlsplit

import msgspec
from pydantic import TypeAdapter, ValidationError

import config

log = logging.getLogger("gateway")

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
DEFAULT_MAX_BODY = 32 * 1024 * 1024  # several base64 images
MAX_DEPTH = 400  # arrays/objects inside each other; 970 deep broke re-encoding (RecursionError)
MAX_NODES = 100_000  # arrays + objects + object members in one body (a 1000-message chat: ~5000)
BODY_TIMEOUT = 60.0  # seconds to receive a whole body once its headers arrived
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
# The top-level `structural_tag` went the same way (vLLM 0.33 has it only in structured_outputs).
LEGACY_CONSTRAINTS = {"guided_json": "json", "guided_regex": "regex",
                      "guided_choice": "choice", "guided_grammar": "grammar",
                      "structural_tag": "structural_tag"}
LEGACY_OPTIONS = {"guided_whitespace_pattern": "whitespace_pattern"}
LEGACY_DROPPED = ("guided_decoding_backend",)  # the backend is server-wide in vLLM 0.33
LEGACY_FIELDS = frozenset([*LEGACY_CONSTRAINTS, *LEGACY_OPTIONS, *LEGACY_DROPPED])
CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
# vLLM request fields that steer the server rather than one request: KV transfer between
# instances (a connector may dial the host it names) and arguments for server-side plugins.
# Nothing a client of a public endpoint needs; vLLM itself refuses `chat_template`,
# `logits_processors` and `priority` unless the server opts in.
OPERATOR_FIELDS = ("kv_transfer_params", "vllm_xargs")
MAX_N = 128  # sequences per request (n, times the prompts of a completion), as OpenAI caps n:
# one request must not fill a replica
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


def clean_api_key(key: str | None) -> str | None:
    """The configured key without the whitespace or newline a secret or .env file often adds
    (kept, it would lock every client out); stripped with a warning that never shows it."""
    if not key or key == key.strip():
        return key or None
    stripped = key.strip()
    log.warning(json.dumps({"event": "api_key_stripped", "message": (
        "the configured API key had surrounding whitespace or a newline; it was stripped: "
        "clients send it without" if stripped else
        "the configured API key is only whitespace: treated as no key")}))
    return stripped or None


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


# ## Reading a request as vLLM will, without building what the gateway does not read
#
# vLLM 0.33 parses the body with json.loads and validates it with pydantic in lax mode
# (`"n": "129"`, `129.0` and `1e3` are 129, 129 and 1000; `"stream": "true"` or `1`
# streams). The gateway decides on the values vLLM will use, so it coerces the few fields it
# reads with pydantic itself. It decodes only the top level, each value kept as its raw
# bytes (msgspec.Raw): a 32 MiB body costs no object per array it holds, and a body that
# needs no change is forwarded byte for byte. msgspec and json.loads agree where the gateway
# reads: on duplicate keys the last one wins for both.

Raw = msgspec.Raw
_NULL = Raw(b"null")
_TOP = msgspec.json.Decoder(dict[str, Raw])
_VALUE = msgspec.json.Decoder()
_OBJECT = msgspec.json.Decoder(msgspec.defstruct("AnyObject", []))  # checks syntax, builds nothing
_encode = msgspec.json.encode
_LAX_INT, _LAX_BOOL = TypeAdapter(int), TypeAdapter(bool)
INVALID = object()  # a value vLLM will refuse itself: the gateway leaves it to vLLM's 400
_SCALAR = 256  # bytes: longer values are not decoded at all (no honest n or stream is longer)
_STRINGS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # linear: run only on syntactically valid JSON
_BRACKETS = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
# A completion's prompts, counted without decoding them: a struct of MAX_N raw slots refuses
# the MAX_N + 1st element as soon as it reaches it.
_PROMPTS = msgspec.json.Decoder(msgspec.defstruct(
    "Prompts", [(f"p{i}", Raw | msgspec.UnsetType, msgspec.UNSET) for i in range(MAX_N)],
    array_like=True, forbid_unknown_fields=True))


def check_shape(body: bytes) -> None:
    """Reject bodies nested deeper than MAX_DEPTH or with more than MAX_NODES containers and
    members (what makes a parser, here or in vLLM, cost many times the body's size)."""
    if body.count(b"[") + body.count(b"{") + body.count(b":") <= MAX_DEPTH:
        return  # the common case: three C scans, nothing to count more closely
    _decode_body(_OBJECT, body)  # valid JSON first: the string pattern below is linear only then
    bare = _STRINGS.sub(b'""', body) if b'"' in body else body
    nodes = bare.count(b"[") + bare.count(b"{") + bare.count(b":")
    if nodes > MAX_NODES:
        raise _reject(400, f"request body has more than {MAX_NODES} arrays, objects and fields")
    brackets = bare.translate(_BRACKETS, _NOT_BRACKETS)  # opening 2, closing 0
    if len(brackets) > 2 * MAX_DEPTH and max(accumulate(b - 1 for b in brackets)) > MAX_DEPTH:
        raise _reject(400, f"request body is nested more than {MAX_DEPTH} deep")


def parse_body(body: bytes) -> dict[str, Raw]:
    """The body's top-level fields as raw JSON values; Reject unless it is a JSON object."""
    check_shape(body)
    return _decode_body(_TOP, body)


def _decode_body(decoder: msgspec.json.Decoder, body: bytes):
    """`decoder` over the body (or a nested object of it), its failures as the client's 400."""
    try:
        return decoder.decode(body)
    except RecursionError:
        raise _reject(400, f"request body is nested more than {MAX_DEPTH} deep") from None
    except msgspec.ValidationError:
        raise _reject(400, "request body must be a JSON object") from None
    except msgspec.DecodeError:
        raise _reject(400, "request body is not valid JSON") from None
    except UnicodeDecodeError:  # in a key; the values' strings are checked only when decoded
        raise _reject(400, "request body is not valid UTF-8") from None


def _first(raw: Raw) -> bytes:
    """A raw value's first byte (values carry no leading whitespace)."""
    return memoryview(raw)[:1].tobytes()


def _decoded(raw: Raw, limit: int | None = _SCALAR):
    """A raw value decoded (INVALID if longer than `limit`: no value the gateway coerces is)."""
    if limit is not None and len(raw) > limit:
        return INVALID
    try:
        return _VALUE.decode(raw)
    except (msgspec.ValidationError, UnicodeDecodeError):
        # 1e400 is past msgspec's range (json.loads makes it inf, which vLLM refuses as an
        # int, a bool or a format type); msgspec checks a raw string's UTF-8 only here.
        return INVALID


def _scalar(raw: Raw, field: str, kind: str):
    """A value the gateway decides on, decoded; a 400 if too long to decode cheaply. It cannot
    be left to vLLM: json.loads and pydantic read `129.000…0` or `"   …129"` at any length."""
    if len(raw) > _SCALAR:
        raise _reject(400, f"'{field}' must be {kind} of at most {_SCALAR} bytes", field)
    return _decoded(raw)


def lax_int(raw: Raw | None, default, field: str = "n"):
    """The integer pydantic's lax mode (so vLLM) makes of a raw value, or INVALID."""
    if raw is None:
        return default
    value = _scalar(raw, field, "an integer")
    if type(value) is int:
        return value
    if value is None or value is INVALID:
        return default if value is None else INVALID
    try:
        return _LAX_INT.validate_python(value)
    except ValidationError:
        return INVALID


def lax_bool(raw: Raw | None, field: str = "stream") -> bool:
    """Whether vLLM takes a raw `stream` (or `echo`) as true: pydantic's lax bool."""
    if raw is None:
        return False
    value = _scalar(raw, field, "a boolean")
    if value is True or value is False:
        return value
    if value is None or value is INVALID:
        return False  # null is vLLM's default; vLLM refuses the rest with a 400
    try:
        return _LAX_BOOL.validate_python(value)
    except ValidationError:
        return False  # vLLM answers 400, as JSON: not a stream


_ARRAY_START = re.compile(rb"\[[ \t\r\n]*(.?)", re.DOTALL)  # JSON's whitespace, then the first


def count_prompts(raw: Raw | None) -> int:
    """How many prompts a completion's `prompt` holds, as vLLM's union type reads it: a string
    or a list of token ids is one; a list of strings or of token lists is one per element
    (MAX_N + 1 standing for 'more than MAX_N')."""
    if raw is None:
        return 1
    opened = _ARRAY_START.match(raw)  # whatever whitespace: a cut-off head misread ints
    if opened is None:
        return 1
    first = opened[1]
    if not first or first in b'"[{n]':  # strings, token lists, junk vLLM refuses, or empty
        try:
            slots = msgspec.structs.astuple(_PROMPTS.decode(raw))
        except (msgspec.ValidationError, msgspec.DecodeError):
            return MAX_N + 1  # more elements than MAX_N (or not an array vLLM accepts)
        return sum(slot is not msgspec.UNSET for slot in slots)
    return 1  # numbers (or lax booleans): one tokenized prompt


def limit_sequences(fields: dict[str, Raw], completions: bool) -> None:
    """Reject what a public endpoint takes from no client (OPERATOR_FIELDS, MAX_N)."""
    for field in OPERATOR_FIELDS:
        if field in fields:
            raise _reject(400, f"'{field}' is not accepted by this endpoint", field)
    n = lax_int(fields.get("n"), 1)
    if n is INVALID or type(n) is not int:
        return  # vLLM refuses it with its own 400
    if n > MAX_N:
        raise _reject(400, f"'n' must be at most {MAX_N}", "n")
    if completions and n >= 1:
        prompts = count_prompts(fields.get("prompt"))
        if n * prompts > MAX_N:
            shown = f"more than {MAX_N}" if prompts > MAX_N else str(prompts)
            raise _reject(400, f"'n' times the number of prompts must be at most {MAX_N} "
                               f"(n {n}, prompts {shown})", "prompt" if n == 1 else "n")


# ## Structured outputs: pass the current API through, translate the legacy one


def _object_keys(raw: Raw | None, field: str) -> dict[str, Raw] | None:
    if raw is None or raw == _NULL:
        return None
    if _first(raw) != b"{":  # vLLM 0.33 crashes into a 500 on these
        raise _reject(400, f"{field} must be an object", field)
    return _members(raw)


def _members(raw: Raw) -> dict[str, Raw]:
    """A nested object's members: its keys are decoded, and only now checked as UTF-8."""
    return _decode_body(_TOP, raw)


def normalize_structured_outputs(fields: dict[str, Raw]) -> bool:
    """Move the legacy fields into structured_outputs in place (True if anything changed);
    Reject a non-object structured_outputs and requests with conflicting constraints."""
    legacy = LEGACY_FIELDS.intersection(fields)
    so_raw = fields.get("structured_outputs")
    if not legacy and so_raw is None:
        return False  # the common case: nothing to check beyond what vLLM checks
    so = _object_keys(so_raw, "structured_outputs")
    kinds = []
    fmt_raw = fields.get("response_format")
    if fmt_raw is not None and _first(fmt_raw) == b"{":
        kind = _decoded(_members(fmt_raw).get("type", _NULL))
        if kind in CONSTRAINING_FORMATS:
            kinds.append(f"response_format {kind}")
    if so:
        kinds += [f"structured_outputs.{k}" for k in CONSTRAINTS
                  if k in so and so[k] != _NULL]
    moved, options = {}, {}
    for field in sorted(legacy):
        value = fields.pop(field)
        if value == _NULL:
            continue
        if field in LEGACY_CONSTRAINTS:
            kinds.append(field)
            moved[LEGACY_CONSTRAINTS[field]] = value
        elif field in LEGACY_OPTIONS:
            options[LEGACY_OPTIONS[field]] = value
    if len(kinds) > 1:
        raise _reject(400, "conflicting structured-output constraints: " + ", ".join(kinds)
                      + "; use exactly one", "structured_outputs")
    if moved or (options and any(k.startswith("structured_outputs.") for k in kinds)):
        # An option alone (guided_whitespace_pattern) is dropped: vLLM 0.33 refuses a
        # structured_outputs without a constraint of its own ("none are specified"). Beside a
        # response_format the old server applied it; 0.33 has no way to say that any more.
        fields["structured_outputs"] = Raw(_encode({**(so or {}), **moved, **options}))
    return bool(legacy)


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
                 max_body_bytes, keepalive_interval, refresh=None, handoff_after=None):
        api_key = clean_api_key(api_key)
        if not api_key and not allow_unauthenticated:
            raise config.UsageError(
                "no API key configured: set API_KEY (Modal secret 'vllm-api-key') or "
                "VLLM_API_KEY for --serve-local, or explicitly allow unauthenticated access")
        self.backend = backend
        self.api_key = api_key  # kept only to mask it in logged paths
        self.key_digest = hashlib.sha256(api_key.encode()).digest() if api_key else None
        self.max_body = max_body_bytes
        self.keepalive = keepalive_interval
        self.handoff_after = handoff_after
        # `refresh()` re-reads what the backend serves (a bare --upstream URL's /v1/models)
        # and calls set_models; tried when a request names a model not listed (see route).
        self.refresh = refresh
        self.routes = {CHAT: CHAT, COMPLETIONS: COMPLETIONS}
        self.set_models(models, unavailable)
        self.no_key = error_body(401, "missing API key: send 'Authorization: Bearer <key>'")
        self.bad_header = error_body(401, "malformed Authorization header: expected "
                                          "'Bearer <key>'")
        self.wrong_key = error_body(401, "invalid API key")
        self.not_found = error_body(404, "not found: this endpoint serves /v1/models, "
                                         "/v1/chat/completions and /v1/completions")
        self.too_large = error_body(413, f"request body larger than {max_body_bytes} bytes")
        self.internal_error = error_body(500, "the gateway failed to handle the request")
        self.too_slow = error_body(408, f"request body not received within {BODY_TIMEOUT:g} s")

    def set_models(self, models, unavailable=None) -> None:
        """What this endpoint serves; the tables are replaced whole, never edited in place."""
        # Every name a request may use -> (its model's pool, the name vLLM serves it under).
        # A LoRA adapter goes to its base model's pool as itself: `python` or `<base>:python`.
        by_name = {alias.lower(): (m, m.name) for m in models for alias in m.aliases}
        for m in models:
            for a in m.adapters:
                by_name[a.name.lower()] = (m, a.name)
                by_name.update({f"{alias}:{a.name}".lower(): (m, a.name) for alias in m.aliases})
        adapter_names = [a.name for m in models for a in m.adapters]
        created = int(time.time())
        self.models = list(models)
        self.by_name = by_name
        self.unavailable = {k.lower(): (k, why) for k, why in (unavailable or {}).items()}
        self.served = (", ".join(m.name for m in models) or "(none)") + (
            f" (adapters: {', '.join(adapter_names)})" if adapter_names else "")
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
                if self.refresh is not None:  # what the upstream serves, before any request
                    await self.refresh(force=True)
                    asking = asyncio.ensure_future(self.refresh.keep_asking())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.refresh is not None:
                    asking.cancel()
                close = getattr(self.backend, "aclose", None)
                if close is not None:
                    await close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def http(self, scope, receive, send) -> None:
        t0 = time.perf_counter()
        ex = _Exchange(send, os.urandom(8).hex().encode())
        path = scope["path"]
        seen = {"model": None, "stream": False}  # filled in as soon as each is known
        try:
            await self.handle(scope, path, receive, ex, seen)
        except Reject as r:
            await ex.reply(r.status, r.body, r.headers)
        except asyncio.CancelledError:
            if not ex.gone:
                raise
            asyncio.current_task().uncancel()  # the client left; nothing to answer
            ex.status = 499
        except Exception as e:  # a failure here still answers in OpenAI's shape, logged once
            seen["error"] = f"gateway failed: {type(e).__name__}"
            if not ex.started and not ex.done:
                await ex.reply(500, self.internal_error)
            raise  # the server logs the traceback
        finally:
            if ex.watcher is not None:
                ex.watcher.cancel()
            if log.isEnabledFor(logging.INFO):
                line = {"request_id": ex.rid.decode(), "method": scope["method"],
                        "path": self.loggable(path), "model": seen["model"],
                        "status": ex.status, "stream": seen["stream"],
                        "ms": round((time.perf_counter() - t0) * 1000, 2)}
                if "error" in seen:
                    line["error"] = seen["error"]
                log.info(json.dumps(line))

    def loggable(self, text: str | None, limit: int = 100) -> str | None:
        """Clipped for a log line, the key masked first (clipping must not cut it in two);
        json.dumps then escapes whatever it holds."""
        if text is None:
            return None
        if self.api_key and self.api_key in text:
            text = text.replace(self.api_key, mask_key(self.api_key))
        return _clip(text, limit)

    async def handle(self, scope, path, receive, ex, seen) -> None:
        route = self.routes.get(path)
        method = scope["method"]
        if route is None:
            if path == "/health" and method in ("GET", "HEAD"):
                await ex.reply(200, self.health_body)
                return
            if path == "/v1/models":
                self.authorize(scope)
                if method not in ("GET", "HEAD"):
                    raise _reject(405, "use GET", headers=((b"allow", b"GET, HEAD"),))
                await ex.reply(200, self.models_body)
                return
            raise Reject(404, self.not_found)
        self.authorize(scope)
        if method != "POST":
            raise _reject(405, "use POST", headers=((b"allow", b"POST"),))
        body = await self.read_body(scope, receive)
        fields = parse_body(body)
        model, served_as = await self.route(fields.get("model"), seen)
        seen["model"] = model.key if served_as == model.name else f"{model.key}:{served_as}"
        limit_sequences(fields, route == COMPLETIONS)
        changed = normalize_structured_outputs(fields)
        stream = seen["stream"] = lax_bool(fields.get("stream"))
        if seen["requested"] != served_as:
            fields["model"] = Raw(_encode(served_as))
            changed = True
        forward = _encode(fields) if changed else body  # the client's bytes when they will do
        ex.watch(receive, self.handoff_after)
        if stream:
            await self.relay_stream(ex, model, route, forward, seen)
        else:
            await self.relay(ex, model, route, forward, seen)

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
        message = await receive()  # the whole body, for any but large or slow ones
        if message["type"] == "http.request" and not message.get("more_body"):
            body = message.get("body", b"")
            if len(body) > self.max_body:  # a chunked body can arrive whole before it is read
                raise Reject(413, self.too_large)
            return body
        try:
            async with asyncio.timeout(BODY_TIMEOUT):  # a trickled body must not hold a task
                return await self._read_rest(message, receive)
        except TimeoutError:
            raise Reject(408, self.too_slow, ((b"connection", b"close"),)) from None

    async def _read_rest(self, message, receive) -> bytes:
        chunks, size = [], 0
        while True:
            if message["type"] == "http.disconnect":
                raise _reject(400, "client disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise Reject(413, self.too_large)
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)
            message = await receive()

    async def route(self, raw: Raw | None, seen) -> tuple[config.Model, str]:
        """The model a request names, decoded as vLLM reads `model` (a string)."""
        if raw is None or raw == _NULL:
            raise _reject(400, f"missing 'model'; served models: {self.served}", "model")
        if _first(raw) != b'"':
            raise _reject(400, "'model' must be a string", "model")
        try:
            name = _VALUE.decode(raw)
        except UnicodeDecodeError:  # top-level decoding kept the value raw, unchecked
            raise _reject(400, "'model' is not valid UTF-8", "model") from None
        seen["requested"] = name
        try:
            return self.route_model(name)
        except Reject:
            seen["model"] = self.loggable(name)  # the name the client sent, clipped
            if self.refresh is None or not await self.refresh():
                raise
        return self.route_model(name)  # what the upstream serves changed: once more

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

    async def relay(self, ex: _Exchange, model, path, body: bytes, seen=None) -> None:
        headers: list[tuple[bytes, bytes]] = []
        called = time.perf_counter()
        try:
            status, raw = await self.backend.send(model, path, body, headers)
        except BackendError as e:
            raise self.backend_reject(e) from None
        except Exception as e:  # noqa: BLE001 - a backend bug still gets an OpenAI-shaped answer
            _note(seen, f"backend failed: {type(e).__name__}")
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

    async def relay_stream(self, ex: _Exchange, model, path, body: bytes, seen=None) -> None:
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
            _note(seen, f"stream failed: {type(e).__name__}")
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


def _note(seen: dict | None, error: str) -> None:
    """A backend failure goes into its request's log line, not a line of its own."""
    if seen is not None:
        seen["error"] = error


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
              refresh=None, handoff_after: float | None = None):
    """The ASGI app. `unavailable`: names known but not served here (any alias) -> why.
    `refresh`: an async callable that re-reads what is served (see Gateway.route).
    `handoff_after`: seconds after which a disconnect of a non-streamed request is Modal's
    303 hand-off to its result URL, not a client that left (None: every disconnect is one)."""
    return Gateway(models, backend, api_key=api_key,
                   allow_unauthenticated=allow_unauthenticated, unavailable=unavailable,
                   max_body_bytes=max_body_bytes, keepalive_interval=keepalive_interval,
                   refresh=refresh, handoff_after=handoff_after)


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
        except aiohttp.ClientError as e:
            if isinstance(getattr(e, "os_error", None), ConnectionRefusedError):
                # vLLM does not listen until its model is loaded: refused is what "starting"
                # looks like (or a server that is down), so the client is told to come back.
                raise BackendError(503, f"backend for '{model.name}' is starting or down: "
                                        "connection refused", DEFAULT_RETRY_AFTER) from None
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


def split_upstreams(matrix: config.Matrix, upstreams: list[str]) -> tuple[dict[str, str], str | None]:
    """'MODEL=URL' routes one model; a bare 'URL' every model not named otherwise:
    ({model key: URL} for the named ones, the bare URL or None)."""
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
    return named, default


def parse_upstreams(matrix: config.Matrix, upstreams: list[str]) -> dict[str, str]:
    """Every model an --upstream may route, to its URL."""
    return _routes(matrix, *split_upstreams(matrix, upstreams))


def _routes(matrix: config.Matrix, named: dict[str, str], default: str | None) -> dict[str, str]:
    return {key: named.get(key, default) for key in matrix.models
            if named.get(key, default) is not None}


LISTING_TIMEOUT = 5.0  # seconds for an upstream's /v1/models (start-up waits for it)


async def upstream_model_ids(backend: HTTPBackend, base_url: str) -> set[str] | None:
    """The ids an OpenAI-compatible server lists at GET /v1/models (lower case), or None."""
    url = base_url.rstrip("/").removesuffix("/v1") + "/v1/models"
    aiohttp = backend.aiohttp
    try:
        # Not the session's hour-long read timeout: start-up, and requests naming an unlisted
        # model, wait for this answer; a hung upstream held the gateway silent for the hour.
        async with backend._session().get(url, headers=backend.headers, timeout=(
                aiohttp.ClientTimeout(total=LISTING_TIMEOUT))) as resp:
            if resp.status != 200:
                return None
            listing = json.loads(await resp.read())
    except (aiohttp.ClientError, TimeoutError, ValueError, RecursionError):
        return None  # RecursionError: a listing nested past json's limit is no listing
    data = listing.get("data") if isinstance(listing, dict) else None
    if not isinstance(data, list):
        return None
    return {str(m.get("id")).lower() for m in data if isinstance(m, dict)}


class UpstreamDiscovery:
    """What a bare --upstream URL serves, read from its /v1/models: at start, every
    `interval` seconds, and when a request names a model it does not list (at most once per
    `min_interval`). Models routed by MODEL=URL are always served; the matrix's other models
    are 404s that say the upstream does not serve them."""

    def __init__(self, matrix: config.Matrix, named: dict[str, str], default: str,
                 backend: HTTPBackend, *, interval: float = 30.0, min_interval: float = 1.0):
        self.matrix, self.named, self.default, self.backend = matrix, named, default, backend
        self.interval, self.min_interval = interval, min_interval
        self.gateway: Gateway | None = None
        self.served: list[str] | None = None  # model keys, None until the upstream answered
        self.asked = -float("inf")
        self.lock = asyncio.Lock()

    def tables(self, listed: set[str] | None) -> tuple[list[config.Model], dict[str, str]]:
        served, unavailable = [], {}
        for m in self.matrix.models.values():
            if m.key in self.named or (listed is not None
                                       and listed.intersection(a.lower() for a in m.aliases)):
                served.append(m)
                continue
            why = (f"the upstream {self.default} does not list it at /v1/models"
                   if listed is not None else
                   f"the upstream {self.default} has not answered /v1/models yet")
            unavailable.update({alias: why for alias in m.aliases})
        return served, unavailable

    async def __call__(self, force: bool = False) -> bool:
        """Ask again; True if what is served changed (Gateway.route then retries)."""
        now = time.monotonic()
        if not force and now - self.asked < self.min_interval:
            return False
        async with self.lock:
            if not force and time.monotonic() - self.asked < self.min_interval:
                return False  # another request asked meanwhile
            self.asked = time.monotonic()
            listed = await upstream_model_ids(self.backend, self.default)
        if listed is None and self.served is not None:
            return False  # keep serving what it listed last; it may be restarting
        served, unavailable = self.tables(listed)
        keys = [m.key for m in served]
        if keys == self.served:
            return False
        self.served = keys
        self.gateway.set_models(served, unavailable)
        log.warning(f"  {self.default} serves: " + (", ".join(
            f"{m.name} ({m.key})" for m in served if m.key not in self.named) or
            "no model of the matrix" if listed is not None else "(no answer at /v1/models yet)"))
        return True

    async def keep_asking(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self(force=True)
            except Exception as e:  # noqa: BLE001 - one bad answer must not end the re-reading
                log.warning(f"  {self.default}: re-reading /v1/models failed: "
                            f"{type(e).__name__}")


def serve_local(matrix: config.Matrix, upstreams: list[str], *, host: str = "127.0.0.1",
                port: int = 8080, api_key: str | None,
                allow_unauthenticated: bool = False, limits=None) -> None:
    """Run the gateway under uvicorn in front of OpenAI-compatible servers; blocks."""
    import uvicorn

    import gateway_server

    named, default = split_upstreams(matrix, upstreams)
    api_key = clean_api_key(api_key)
    if not api_key and not allow_unauthenticated:
        raise config.UsageError("no API key: set VLLM_API_KEY, or pass --allow-unauthenticated "
                                "to serve without one")
    urls = _routes(matrix, named, default)
    backend = HTTPBackend(urls, api_key=os.environ.get("VLLM_UPSTREAM_API_KEY") or None)
    discovery = None
    if default is None:
        served = [matrix.models[key] for key in urls]
        unavailable = {alias: "no --upstream was given for it" for m in matrix.models.values()
                       if m.key not in urls for alias in m.aliases}
    else:  # what the bare URL serves is asked at start-up (the lifespan), before any request
        discovery = UpstreamDiscovery(matrix, named, default, backend)
        served, unavailable = discovery.tables(None)
    gateway_server.configure_logging(sys.stderr)
    app = build_app(served, backend, api_key=api_key,
                    allow_unauthenticated=allow_unauthenticated, unavailable=unavailable,
                    refresh=discovery)
    if discovery is not None:
        discovery.gateway = app
    limits = limits or gateway_server.default_limits()
    sock = gateway_server.listening_socket(host, port)  # one line and exit 9 if it cannot
    shown = f"[{host}]" if ":" in host else host
    say = log.warning
    say(f"gateway on http://{shown}:{gateway_server.bound_port(sock)}/v1  key {mask_key(api_key)}")
    for key, url in named.items():
        say(f"  {matrix.models[key].name} ({key}) -> {url}")
    if default is not None:
        say(f"  every other model it lists at /v1/models -> {default}")
    if not api_key:
        say("WARNING: no API key: anyone who can reach this port can use it")
    server = uvicorn.Server(uvicorn.Config(
        app, http=gateway_server.protocol_class(limits), ws="none", lifespan="on",
        log_config=None, access_log=False, server_header=False, date_header=False,
        timeout_keep_alive=limits.keepalive_timeout))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
