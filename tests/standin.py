"""A stand-in for `vllm serve` 0.33: the same routes, response and error shapes, no GPU.

Tests, conformance checks and benchmarks run it in a thread (`StandIn(...)` is an
ASGI app, served by `standin_server`) or as a process (`python tests/standin.py --port N
...`). Behaviours: honour or ignore structured-output constraints, be slow to become ready,
break streams off, require a key, answer slowly, fail with a status. It records every
request it receives (`.received`, or GET /_standin/received across processes)
and every client that left before its answer was complete (`.disconnects`).

Where it follows vLLM 0.33 (vllm/entrypoints/openai/{chat_completion,completion}/protocol.py,
vllm/entrypoints/serve/...), because the gateway's tests rely on it:
- requests are validated by pydantic in lax mode: `"stream": "true"`, `1` or `"yes"` stream,
  `"n": "3"`, `3.0` or `3e0` are 3 (pydantic's own TypeAdapters here, as vLLM's models);
- a `structured_outputs` that is not an object crashes vLLM's `check_structured_outputs_count`
  (`.get` on a str) into its catch-all handler: HTTP 500, InternalServerError;
- one with no constraint, or two, is a 400 (StructuredOutputsParams.__post_init__);
- a starting server does not listen at all (the model loads before uvicorn binds): clients
  see connection refused, never a 503 (`ready_after`; `standin_server` binds late);
- a chat message carries `reasoning` (not `reasoning_content`, renamed in vLLM 0.1x) and no
  `tool_calls` key when there are none (ChatMessage._serialize drops the empty list);
- a field of the wrong type is FastAPI's RequestValidationError, which vLLM answers 400 with
  type "Bad Request" and param "body.<field>" (serve/exception_handling/handlers/validation.py);
- `stream_options` on a request that does not stream (raw truthiness, a "before" validator)
  is a 400 (validate_stream_options); a chat's `max_completion_tokens` wins over `max_tokens`
  (chat_completion/serving.py), a completion has only `max_tokens` (default 16);
- `model` may be left out: vLLM then serves its first name (serve/engine/serving.py
  _is_model_supported); /v1/models cards carry a `permission` list (models/serving.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import threading
import time
import uuid
from contextlib import contextmanager

from pydantic import TypeAdapter, ValidationError

# vLLM 0.33's field types, validated as its pydantic request models do (lax mode).
LAX = {"stream": TypeAdapter(bool | None), "echo": TypeAdapter(bool | None),
       "n": TypeAdapter(int | None), "max_tokens": TypeAdapter(int | None),
       "max_completion_tokens": TypeAdapter(int | None)}
MAX_N_SEQUENCES = 16384  # vllm/envs.py VLLM_MAX_N_SEQUENCES

CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


class LaxError(Exception):
    """A field pydantic's lax mode cannot coerce: vLLM's 400."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field, self.message = field, message


class BrokenStream(Exception):
    """Raised inside a streaming response: uvicorn then drops the connection mid-body."""


# ## Output that satisfies a constraint


def from_schema(schema, root=None, depth=0):
    """A small JSON instance of a JSON schema (the common keywords)."""
    root = schema if root is None else root
    if not isinstance(schema, dict) or depth > 20:
        return None
    if "$ref" in schema:
        target = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target.get(part, {}) if part else target
        return from_schema(target, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            return from_schema(schema[key][0], root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or "properties" in schema:
        return {k: from_schema(v, root, depth + 1) for k, v in schema.get("properties", {}).items()}
    if kind == "array":
        return [from_schema(schema.get("items", {}), root, depth + 1)
                for _ in range(max(1, schema.get("minItems", 1)))]
    if kind == "string":
        if "pattern" in schema:
            return from_regex(schema["pattern"])
        return "x" * max(4, schema.get("minLength", 0))
    if kind == "integer":
        return int(schema.get("minimum", 42))
    if kind == "number":
        return float(schema.get("minimum", 0.5))
    if kind == "boolean":
        return True
    return None


def _category(name: str) -> str:
    return {"DIGIT": "7", "WORD": "a", "SPACE": " ", "NOT_DIGIT": "a",
            "NOT_WORD": "-", "NOT_SPACE": "a"}.get(name.removeprefix("CATEGORY_"), "a")


def _in_set(ch: str, items) -> bool:
    for op, arg in items:
        name = str(op)
        if name == "LITERAL" and ord(ch) == arg:
            return True
        if name == "RANGE" and arg[0] <= ord(ch) <= arg[1]:
            return True
        if name == "CATEGORY" and re.fullmatch(
                {"CATEGORY_DIGIT": r"\d", "CATEGORY_WORD": r"\w", "CATEGORY_SPACE": r"\s",
                 "CATEGORY_NOT_DIGIT": r"\D", "CATEGORY_NOT_WORD": r"\W",
                 "CATEGORY_NOT_SPACE": r"\S"}[str(arg)], ch):
            return True
    return False


def _from_parsed(parsed) -> str:
    out = []
    for op, arg in parsed:
        name = str(op)
        if name == "LITERAL":
            out.append(chr(arg))
        elif name == "NOT_LITERAL":
            out.append("a" if arg != ord("a") else "b")
        elif name == "ANY":
            out.append("a")
        elif name == "IN":
            negate = arg and str(arg[0][0]) == "NEGATE"
            items = arg[1:] if negate else arg
            if negate:
                out.append(next(c for c in "aZ0- _.x" if not _in_set(c, items)))
            else:
                kind, first = str(items[0][0]), items[0][1]
                out.append(chr(first) if kind == "LITERAL" else chr(first[0])
                           if kind == "RANGE" else _category(str(first)))
        elif name == "BRANCH":
            out.append(_from_parsed(arg[1][0]))
        elif name == "SUBPATTERN":
            out.append(_from_parsed(arg[3]))
        elif name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            low, _, sub = arg
            out.append(_from_parsed(sub) * low)  # the fewest repeats allowed
        elif name == "ATOMIC_GROUP":
            out.append(_from_parsed(arg))
        # AT (anchors), ASSERT, GROUPREF: contribute no characters
    return "".join(out)


def from_regex(pattern: str) -> str:
    """The shortest-ish string that fully matches a (simple) regex."""
    from re import _parser

    text = _from_parsed(_parser.parse(pattern))
    if not re.fullmatch(pattern, text):
        raise ValueError(f"stand-in cannot generate text for regex {pattern!r}")
    return text


_GRAMMAR_TOKEN = re.compile(r'\s*("(?:[^"\\]|\\.)*"|\[(?:[^\]\\]|\\.)*\]|[A-Za-z_][\w-]*|::=|[|()*+?])')


def from_grammar(grammar: str) -> str:
    """A sentence of a GBNF/EBNF grammar (first alternative each time), from `root`."""
    rules = {}
    for line in grammar.splitlines():
        if "::=" in line:
            name, _, rhs = line.partition("::=")
            rules[name.strip()] = _GRAMMAR_TOKEN.findall(rhs)

    def sequence(tokens, i, depth):
        out = []
        while i < len(tokens) and tokens[i] not in ("|", ")"):
            tok = tokens[i]
            if tok == "(":
                text, i = alternatives(tokens, i + 1, depth)
                i += 1  # the ")"
            elif tok.startswith('"'):
                text, i = json.loads(tok), i + 1
            elif tok.startswith("["):
                text, i = tok[1], i + 1
            else:
                if depth > 50 or tok not in rules:
                    raise ValueError(f"stand-in cannot expand grammar rule {tok!r}")
                text, _ = alternatives(rules[tok], 0, depth + 1)
                i += 1
            if i < len(tokens) and tokens[i] in ("*", "?", "+"):
                text = "" if tokens[i] in ("*", "?") else text
                i += 1
            out.append(text)
        return "".join(out), i

    def alternatives(tokens, i, depth):
        text, i = sequence(tokens, i, depth)
        while i < len(tokens) and tokens[i] == "|":  # skip the other alternatives
            _, i = sequence(tokens, i + 1, depth)
        return text, i

    if "root" not in rules:
        raise ValueError("grammar has no root rule")
    return alternatives(rules["root"], 0, 0)[0]


# ## The server


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _error(status: int, message: str, kind: str = "BadRequestError", param=None) -> tuple:
    return status, {"error": {"message": message, "type": kind, "param": param, "code": status}}


class StandIn:
    def __init__(self, served_model_names=("google/gemma-3-12b-it",), *, api_key=None,
                 honour_constraints=True, ready_after=0.0, break_after=None, delay=0.0,
                 token_delay=0.0, fail_status=None, max_model_len=32768):
        self.names = list(served_model_names)
        self.api_key = api_key
        self.honour = honour_constraints
        self.ready_at = time.monotonic() + ready_after
        self.break_after = break_after
        self.delay, self.token_delay = delay, token_delay
        self.fail_status = fail_status
        self.max_model_len = max_model_len
        self.abandoned = False  # set when its server is stopped before it was ready
        self.received: list[dict] = []  # {"method", "path", "headers", "body"}
        self.raw_bodies: list[bytes] = []
        self.disconnects: list[str] = []

    @property
    def last_body(self) -> dict | None:
        return self.received[-1]["body"] if self.received else None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                # Like vLLM: nothing listens until the model is loaded (uvicorn binds after
                # the lifespan's startup completes).
                while time.monotonic() < self.ready_at and not self.abandoned:
                    await asyncio.sleep(min(0.05, self.ready_at - time.monotonic()))
                await send({"type": "lifespan.startup.failed" if self.abandoned
                            else "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        path, method = scope["path"], scope["method"]
        if path == "/_standin/received":  # test plumbing across processes, not vLLM
            return await self._json(send, 200, {"received": self.received,
                                                "disconnects": self.disconnects})
        headers = {k.decode(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        self.received.append({"method": method, "path": path, "headers": headers, "body": body})
        self.raw_bodies.append(raw)  # the exact bytes, for tests of what is forwarded as is
        if path.startswith("/v1") and self.api_key and \
                headers.get("authorization") != f"Bearer {self.api_key}":
            return await self._json(send, 401, {"error": "Unauthorized"})  # vLLM's own, bare
        if path == "/health" and method == "GET":
            return await self._raw(send, 200, b"", b"application/json")
        if path == "/v1/models" and method == "GET":
            return await self._json(send, 200, {"object": "list", "data": [
                {"id": n, "object": "model", "created": int(time.time()), "owned_by": "vllm",
                 "root": self.names[0], "parent": None, "max_model_len": self.max_model_len,
                 "permission": [{"id": f"modelperm-{uuid.uuid4().hex}",
                                 "object": "model_permission", "created": int(time.time()),
                                 "allow_create_engine": False, "allow_sampling": True,
                                 "allow_logprobs": True, "allow_search_indices": False,
                                 "allow_view": True, "allow_fine_tuning": False,
                                 "organization": "*", "group": None, "is_blocking": False}]}
                for n in self.names]})
        if path not in ("/v1/chat/completions", "/v1/completions"):
            return await self._json(send, 404, {"detail": "Not Found"})
        if method != "POST":
            return await self._json(send, 405, {"detail": "Method Not Allowed"})
        if self.fail_status:
            return await self._json(send, *_error(self.fail_status, "stand-in failure",
                                                  "InternalServerError"))
        chat = path == "/v1/chat/completions"
        problem = self._invalid(body, chat)
        if problem:
            return await self._json(send, *problem)
        body = {**body, **self._coerced(body)}  # what vLLM's lax validation made of it
        body.setdefault("model", self.names[0])
        try:
            text, finish = self._answer(body, chat)
        except Exception as exc:  # noqa: BLE001 - vLLM refuses unusable constraints with a 400
            return await self._json(send, *_error(400, f"invalid structured outputs: {exc}"))
        gone = asyncio.ensure_future(receive())  # resolves when the client leaves
        try:
            if self.delay and await self._left(gone, self.delay):
                return self.disconnects.append(path)
            if body.get("stream"):
                return await self._stream(send, gone, path, body, chat, text, finish)
            return await self._json(send, 200, self._completion(body, chat, text, finish))
        finally:
            gone.cancel()

    def _invalid(self, body, chat: bool):
        if not isinstance(body, dict):
            return _error(400, "request body must be a JSON object")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            return _error(400, "1 validation error:\n  {'type': 'string_type', 'loc': 'body.model'"
                          "}", "Bad Request", "body.model")
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages or \
                    not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
                return _error(400, "messages: Input should be a non-empty list of messages")
        elif not isinstance(body.get("prompt"), (str, list)):
            return _error(400, "prompt: Field required", param="prompt")
        so = body.get("structured_outputs")
        if so is not None and not isinstance(so, dict):  # vLLM 0.33: AttributeError, a 500
            return _error(500, f"'{type(so).__name__}' object has no attribute 'get'",
                          "InternalServerError")
        try:
            coerced = self._coerced(body)
        except LaxError as exc:  # FastAPI's RequestValidationError, as vLLM words it
            return _error(400, f"1 validation error:\n  {{'loc': 'body.{exc.field}', 'msg': "
                          f"{exc.message!r}}}", "Bad Request", f"body.{exc.field}")
        if body.get("stream_options") and not body.get("stream"):
            return _error(400, "Stream options can only be defined when `stream=True`. "
                          "(parameter=stream_options)", param="stream_options")
        for field in ("response_format", "stream_options"):
            if body.get(field) is not None and not isinstance(body.get(field), dict):
                return _error(400, f"{field}: Input should be an object", param=field)
        if so and sum(so.get(k) is not None for k in CONSTRAINTS) != 1:
            return _error(400, "You must use exactly one kind of structured outputs constraint")
        # The request parsed; vLLM's handler checks the model, then builds SamplingParams.
        if model and model not in self.names:
            return _error(404, f"The model `{model}` does not exist. Valid aliases: "
                          f"{', '.join(self.names)}.", "NotFoundError", "model")
        for field in ("max_tokens", "max_completion_tokens"):
            if coerced.get(field) is not None and coerced[field] < 1:
                return _error(400, f"max_tokens must be at least 1, got {coerced[field]}. "
                              f"(parameter=max_tokens, value={coerced[field]})", param="max_tokens")
        n = coerced.get("n")
        if n is not None and not 1 <= n <= MAX_N_SEQUENCES:  # sampling_params.py: no param
            return _error(400, f"n must be at least 1, got {n}." if n < 1 else
                          f"n must be at most {MAX_N_SEQUENCES}, got {n}. To increase this "
                          "limit, set the VLLM_MAX_N_SEQUENCES environment variable.")
        return None

    @staticmethod
    def _coerced(body) -> dict:
        """The lax-typed fields as vLLM's pydantic models make them (ValidationError if not)."""
        out = {}
        for field, adapter in LAX.items():
            if field in body:
                try:
                    out[field] = adapter.validate_python(body[field])
                except ValidationError as exc:
                    raise LaxError(field, exc.errors()[0]["msg"]) from None
        return out

    def _prompt(self, body, chat: bool) -> str:
        if not chat:
            prompt = body["prompt"]
            return prompt if isinstance(prompt, str) else " ".join(map(str, prompt))
        content = body["messages"][-1].get("content")
        if isinstance(content, list):
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        return content if isinstance(content, str) else ""

    def _answer(self, body, chat: bool) -> tuple[str, str]:
        """The reply text and finish reason: constrained if asked (and honouring), else plain."""
        constrained = self._constrained(body) if self.honour else None
        if constrained is not None:
            return constrained, "stop"
        words = ("This is the stand-in answering: " + self._prompt(body, chat)).split()
        limit = (body.get("max_completion_tokens") if chat else None) or \
            body.get("max_tokens") or 16
        return " ".join(words[:limit]), "length" if len(words) > limit else "stop"

    def _constrained(self, body) -> str | None:
        so = body.get("structured_outputs") or {}
        fmt = body.get("response_format") or {}
        if so.get("json") is not None:
            schema = so["json"]
            return json.dumps(from_schema(json.loads(schema) if isinstance(schema, str) else schema))
        if so.get("regex") is not None:
            return from_regex(so["regex"])
        if so.get("choice") is not None:
            return str(so["choice"][0])
        if so.get("grammar") is not None:
            return from_grammar(so["grammar"])
        if so.get("json_object") or fmt.get("type") == "json_object":
            return json.dumps({"answer": "stand-in"})
        if fmt.get("type") == "json_schema":
            return json.dumps(from_schema(fmt["json_schema"]["schema"]))
        return None

    def _usage(self, body, chat, text) -> dict:
        prompt = len(self._prompt(body, chat).split()) + 1
        completion = len(text.split())
        return {"prompt_tokens": prompt, "total_tokens": prompt + completion,
                "completion_tokens": completion, "prompt_tokens_details": None}

    def _completion(self, body, chat, text, finish) -> dict:
        base = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": body["model"]}
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text,
                                              "refusal": None, "reasoning": None},
                      "logprobs": None, "finish_reason": finish, "stop_reason": None}
        else:
            echoed = self._prompt(body, chat) if body.get("echo") else ""
            choice = {"index": 0, "text": echoed + text, "logprobs": None,
                      "finish_reason": finish, "stop_reason": None, "prompt_logprobs": None}
        choices = [{**choice, "index": i} for i in range(body.get("n") or 1)]
        return {**base, "choices": choices, "service_tier": None, "system_fingerprint": None,
                "usage": self._usage(body, chat, text), "prompt_logprobs": None,
                "kv_transfer_params": None}

    async def _stream(self, send, gone, path, body, chat, text, finish):
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8")]})
        cid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        base = {"id": cid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": body["model"]}
        pieces = [w if i == 0 else " " + w for i, w in enumerate(text.split(" "))]
        events = []
        if chat:
            events.append({"delta": {"role": "assistant", "content": ""}})
            events += [{"delta": {"content": p}} for p in pieces]
            events.append({"delta": {}, "finish_reason": finish, "stop_reason": None})
        else:
            if body.get("echo"):
                pieces.insert(0, self._prompt(body, chat))
            events += [{"text": p} for p in pieces]
            events[-1] = {**events[-1], "finish_reason": finish, "stop_reason": None}
        for n, event in enumerate(events):
            if self.break_after is not None and n >= self.break_after:
                raise BrokenStream("stand-in breaks the stream off")
            choice = {"index": 0, "logprobs": None, "finish_reason": None, **event}
            await send({"type": "http.response.body", "body": _sse({**base, "choices": [choice]}),
                        "more_body": True})
            if await self._left(gone, self.token_delay):
                return self.disconnects.append(path)
        tail = b""
        if (body.get("stream_options") or {}).get("include_usage"):
            tail = _sse({**base, "choices": [], "usage": self._usage(body, chat, text)})
        await send({"type": "http.response.body", "body": tail + b"data: [DONE]\n\n"})

    @staticmethod
    async def _left(gone, seconds: float) -> bool:
        """Wait (or just yield); True if the client disconnected meanwhile."""
        if seconds:
            await asyncio.wait((gone,), timeout=seconds)
        else:
            await asyncio.sleep(0)
        return gone.done()

    @staticmethod
    async def _raw(send, status, data: bytes, ctype: bytes):
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", ctype), (b"content-length", b"%d" % len(data))]})
        await send({"type": "http.response.body", "body": data})

    async def _json(self, send, status, obj):
        await self._raw(send, status, json.dumps(obj).encode(), b"application/json")


class _LateServer:
    """A stand-in served from a thread on a port that is bound at once but listens only when
    the stand-in is ready (`ready_after`): until then, connecting is refused, as with vLLM."""

    def __init__(self, app: StandIn, **options):
        import uvicorn

        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="critical", access_log=False,
                                                   lifespan="on", **options))
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"standin-{self.port}")

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except SystemExit:
            pass  # uvicorn's exit when a start-up is abandoned (stopped before it was ready)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def listening(self) -> bool:
        return self.server.started


@contextmanager
def standin_server(app: StandIn, *, wait: bool = True, **options):
    """Serve `app` in a thread; with wait=True, return once it listens (after ready_after)."""
    server = _LateServer(app, **options)
    server.thread.start()
    try:
        deadline = time.monotonic() + 10 + max(0.0, app.ready_at - time.monotonic())
        while wait and not server.listening:
            if not server.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("stand-in server did not start")
            time.sleep(0.005)
        yield server
    finally:
        server.server.should_exit = True
        app.abandoned = not server.listening  # a start-up still waiting gives up, unbound
        server.thread.join(timeout=10)
        server.sock.close()


def main(argv=None) -> None:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", nargs="+", default=["google/gemma-3-12b-it"])
    p.add_argument("--api-key")
    p.add_argument("--ignore-constraints", action="store_true",
                   help="answer plain text whatever constraint is asked (like guided_* today)")
    p.add_argument("--ready-after", type=float, default=0.0,
                   help="listen only after this many seconds (vLLM loading its model)")
    p.add_argument("--break-after", type=int, help="drop the connection after N stream chunks")
    p.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    p.add_argument("--token-delay", type=float, default=0.0, help="seconds between chunks")
    p.add_argument("--fail-status", type=int, help="answer every completion with this status")
    a = p.parse_args(argv)
    app = StandIn(a.served_model_name, api_key=a.api_key,
                  honour_constraints=not a.ignore_constraints, ready_after=a.ready_after,
                  break_after=a.break_after, delay=a.delay, token_delay=a.token_delay,
                  fail_status=a.fail_status)
    print(f"stand-in on http://{a.host}:{a.port}", flush=True)
    uvicorn.run(app, host=a.host, port=a.port, log_level="critical", access_log=False,
                server_header=False, date_header=False)


if __name__ == "__main__":
    main()
