"""Does an endpoint really work? The conformance suite (`--test-gpu`, `--test`) and the
warm-up (`--warm`, `--keep-warm`).

Both speak to one OpenAI-compatible endpoint, a deployed app's gateway or any
`--base-url`, over httpx, and both expect a cold start: a scaled-to-zero model
answers 503 (or Modal's proxy 502/504, or nothing at all) for minutes before
its first token. Every request is therefore retried with backoff until a
deadline, Modal's 303 redirects (a web call longer than 150 s) are followed,
and the time spent waiting is reported apart from each check's own latency.

Structured outputs are verified here, on the client: vLLM answers 200 with
unconstrained text to a constraint it does not understand, so "accepted" is
not "enforced". Each check sends exactly the spec's example and checks the
answer against it (JSON parse, schema, full regex match, choice, grammar).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import secrets
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Self
from urllib.parse import urlsplit

import httpx

import config
import plan

DEFAULT_DEADLINE = 15 * 60  # seconds: a queued cold start that downloads weights takes minutes
RETRY_STATUSES = frozenset({502, 503, 504})  # a model starting, or Modal's proxy meanwhile
FIRST_BACKOFF, MAX_BACKOFF = 0.25, 10.0  # seconds between attempts: doubling, capped
CONNECT_TIMEOUT = 10.0  # seconds to open a connection
READ_TIMEOUT = 300.0  # seconds for one answer (Modal turns a call over 150 s into a 303)
MIN_READ_TIMEOUT = 60.0  # seconds an attempt may wait even past the deadline
# Seconds a URL that is not a Modal endpoint may refuse connections (or not resolve) before
# we give up on it. Modal's endpoints never refuse while cold: Modal's proxy takes the
# request and holds it (or answers 503) while a container starts, so there a refusal is
# retried until the deadline like any cold start. Elsewhere a server being restarted
# listens again within seconds, and a wrong --base-url refuses for ever; a vLLM server
# still loading its model refuses too until it is ready, and the error says so.
UNREACHABLE_GRACE = 15.0
MODAL_HOST_SUFFIX = ".modal.run"  # https://<workspace>--<app>-<function>.modal.run


# ## Talking to an endpoint through its cold start


class NotReady(Exception):
    """The endpoint kept answering 502/503/504 (or nothing) until the deadline."""


class Unreachable(config.UserError):
    """A URL that is not a Modal endpoint refused connections (or did not resolve) for
    UNREACHABLE_GRACE seconds: every later request would fail the same way, so the run
    ends with this one line instead of a table of identical failures."""

    exit_code = 1


def _cannot_connect(exc: BaseException) -> str | None:
    """'connection refused' or 'the name does not resolve' when that is why `exc` (an httpx
    error) failed: what no retry fixes while nothing listens there; else None."""
    import socket

    seen = exc
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError):
            return "connection refused"
        if isinstance(seen, socket.gaierror):
            return "the name does not resolve"
        seen = seen.__cause__ or seen.__context__
    text = str(exc)  # httpcore re-raises some failures with the text only
    if "Connection refused" in text:
        return "connection refused"
    if "Name or service not known" in text or "nodename nor servname" in text:
        return "the name does not resolve"
    return None


def is_modal_url(url: str) -> bool:
    """Whether a (normalized) base URL is a Modal web endpoint."""
    return (urlsplit(url).hostname or "").endswith(MODAL_HOST_SUFFIX)


def normalize_base_url(url: str) -> str:
    """`https://host/v1/` and `https://host` both name the endpoint `https://host`."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise config.UsageError(f"--base-url '{url}': expected an http(s):// URL")
    return url.strip().rstrip("/").removesuffix("/v1")


def error_message(resp: httpx.Response) -> str:
    """The message of an OpenAI-shaped (or vLLM's bare, or any) error body, shortened."""
    try:
        body = resp.json()
    except ValueError:
        return _clip(resp.text.strip() or resp.reason_phrase)
    err = body.get("error", body.get("detail")) if isinstance(body, dict) else body
    if isinstance(err, dict):
        err = err.get("message", err)
    return _clip(str(err))


def _clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _permanent(resp: httpx.Response) -> bool:
    """A 502 that no wait will fix: the gateway's backend refused the gateway's own key."""
    return resp.status_code == 502 and "credentials" in error_message(resp)


@dataclass
class Answer:
    """One request's final answer: `waited` is the cold start before it, `latency` its own time."""

    resp: httpx.Response
    latency: float  # seconds from sending to the answer (to its headers, for a stream)
    waited: float  # seconds of retries before the request that was answered
    attempts: int
    sent: float  # time.monotonic() when the answered request was sent

    @property
    def status(self) -> int:
        return self.resp.status_code

    def json(self):
        try:
            return self.resp.json()
        except ValueError:
            return None


OWN_KEY = object()  # send the endpoint's key (the default); None sends no Authorization header


class Endpoint:
    """An OpenAI-compatible endpoint: its base URL, key, and one retry deadline for all calls."""

    def __init__(self, base_url: str, api_key: str | None, *, deadline_s: float,
                 max_connections: int = 32, on_wait=None,
                 transport: httpx.AsyncBaseTransport | None = None):
        """`on_wait(reason)` is called after each failed try with why it failed (one line):
        what the caller shows while the endpoint starts."""
        self.base_url = normalize_base_url(base_url)
        self.api_key = api_key
        self.deadline = time.monotonic() + deadline_s
        self.deadline_s = deadline_s
        self.on_wait = on_wait
        self.is_modal = is_modal_url(self.base_url)
        self._unreachable_since: float | None = None  # first of the refusals in a row
        self.client = httpx.AsyncClient(
            base_url=self.base_url, follow_redirects=True,  # Modal: 303 to the result URL
            timeout=httpx.Timeout(READ_TIMEOUT, connect=CONNECT_TIMEOUT),
            limits=httpx.Limits(max_connections=max_connections,
                                max_keepalive_connections=max_connections),
            transport=transport)  # e.g. aiohttp_transport's, for many requests in flight

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.client.aclose()

    def headers(self, key=OWN_KEY) -> dict[str, str]:
        key = self.api_key if key is OWN_KEY else key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _timeout(self) -> httpx.Timeout:
        """Near the deadline an attempt waits less, but never too little for a real answer
        (the deadline bounds the waiting for a cold start, not a warm model's work)."""
        remaining = self.deadline - time.monotonic()
        return httpx.Timeout(min(READ_TIMEOUT, max(MIN_READ_TIMEOUT, remaining)),
                             connect=CONNECT_TIMEOUT)

    async def send(self, method: str, path: str, body: dict | None = None, *, key=OWN_KEY,
                   stream: bool = False) -> Answer:
        """Send until an answer other than 502/503/504 comes, or raise NotReady at the deadline.

        With `stream`, the answer's body is not read: the caller iterates and closes it.
        """
        first = time.monotonic()
        delay, attempts, last = FIRST_BACKOFF, 0, ""
        while True:
            attempts += 1
            sent = time.monotonic()
            request = self.client.build_request(method, path, json=body, headers=self.headers(key),
                                                timeout=self._timeout())
            try:
                resp = await self.client.send(request, stream=stream)
            except httpx.TimeoutException:
                last = "timed out"
                self._unreachable_since = None
            except httpx.TransportError as exc:
                why = _cannot_connect(exc)
                last = (f"{why} ({urlsplit(self.base_url).netloc})" if why else
                        f"connection failed ({type(exc).__name__}: {_clip(str(exc), 60)})")
                self._give_up_if_unreachable(why)
            else:
                self._unreachable_since = None
                if stream and resp.status_code in RETRY_STATUSES:
                    await resp.aread()  # an error body is short; read it, free the connection
                    await resp.aclose()
                if resp.status_code not in RETRY_STATUSES or _permanent(resp):
                    return Answer(resp, time.monotonic() - sent, sent - first, attempts, sent)
                last = f"HTTP {resp.status_code}: {error_message(resp)}"
            if self.on_wait is not None:
                self.on_wait(last)
            now = time.monotonic()
            if now + delay > self.deadline:
                raise NotReady(f"no answer within the deadline ({self.deadline_s:g} s) after "
                               f"{now - first:.1f} s and {attempts} attempt(s); last: {last}")
            pause = delay
            if self._unreachable_since is not None:  # try once more as the grace ends
                pause = min(delay, max(0.0, self._unreachable_since + UNREACHABLE_GRACE - now))
            await asyncio.sleep(pause)
            delay = min(delay * 2, MAX_BACKOFF)

    def _give_up_if_unreachable(self, why: str | None) -> None:
        """Raise Unreachable once a non-Modal URL has refused (or not resolved) for the grace
        period; any other outcome starts the count again."""
        if why is None or self.is_modal:
            self._unreachable_since = None
            return
        now = time.monotonic()
        if self._unreachable_since is None:
            self._unreachable_since = now
        if now - self._unreachable_since < UNREACHABLE_GRACE:
            return
        parts, waited = urlsplit(self.base_url), now - self._unreachable_since
        if why == "connection refused":
            raise Unreachable(
                f"{self.base_url}: connection refused for {waited:.0f} s: nothing listens at "
                f"{parts.netloc}. Check the URL; a vLLM server still loading its model refuses "
                "connections until it is ready: run this again once it listens")
        raise Unreachable(f"{self.base_url}: the name {parts.hostname} did not resolve for "
                          f"{waited:.0f} s; check the URL")


# ## Verifying structured outputs client-side


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    return {float: "number", str: "string", list: "array", dict: "object"}.get(type(value),
                                                                              type(value).__name__)


def _is_type(value, kind: str) -> bool:
    actual = _json_type(value)
    return actual == kind or (kind == "number" and actual == "integer")


def schema_errors(schema: dict, value, path: str = "$") -> list[str]:
    """Where `value` breaks `schema`: the JSON Schema subset the suite's schemas use
    (type, properties, required, additionalProperties: false, items, enum, const)."""
    kinds = schema.get("type")
    if kinds is not None:
        kinds = kinds if isinstance(kinds, list) else [kinds]
        if not any(_is_type(value, k) for k in kinds):
            return [f"{path}: expected {' or '.join(kinds)}, got {_json_type(value)}"]
    errors = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if "const" in schema and value != schema["const"]:
        errors.append(f"{path}: expected {schema['const']!r}")
    if isinstance(value, dict):
        errors += [f"{path}: missing required '{name}'" for name in schema.get("required", [])
                   if name not in value]
        properties = schema.get("properties", {})
        for name, sub in properties.items():
            if name in value:
                errors += schema_errors(sub, value[name], f"{path}.{name}")
        if schema.get("additionalProperties") is False:
            errors += [f"{path}: unexpected '{name}'" for name in value if name not in properties]
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            errors += schema_errors(schema["items"], item, f"{path}[{i}]")
    return errors


_EBNF_TOKEN = re.compile(r'\s*("(?:[^"\\]|\\.)*"|\[(?:[^\]\\]|\\.)*\]|[A-Za-z_][\w-]*|[|()*+?])')


def grammar_regex(grammar: str) -> re.Pattern:
    """A regex for the language of a small, non-recursive EBNF grammar from `root`:
    "literals", rule names, [classes], |, ( ), * + ?. The spec's SQL grammar is of this kind."""
    rules = {}
    for line in grammar.splitlines():
        name, sep, rhs = line.partition("::=")
        if sep:
            rules[name.strip()] = _EBNF_TOKEN.findall(rhs)

    def alternatives(tokens: list[str], i: int, stack: tuple[str, ...]) -> tuple[str, int]:
        branches = []
        while True:
            seq, i = sequence(tokens, i, stack)
            branches.append(seq)
            if i < len(tokens) and tokens[i] == "|":
                i += 1
                continue
            return "(?:" + "|".join(branches) + ")", i

    def sequence(tokens: list[str], i: int, stack: tuple[str, ...]) -> tuple[str, int]:
        out = []
        while i < len(tokens) and tokens[i] not in ("|", ")"):
            tok = tokens[i]
            if tok == "(":
                part, i = alternatives(tokens, i + 1, stack)
                i += 1  # the ")"
            elif tok.startswith('"'):
                part, i = re.escape(json.loads(tok)), i + 1
            elif tok.startswith("["):
                part, i = tok, i + 1
            elif tok in rules and tok not in stack:
                part, _ = alternatives(rules[tok], 0, (*stack, tok))
                i += 1
            else:
                raise ValueError(f"grammar rule '{tok}' is undefined or recursive")
            if i < len(tokens) and tokens[i] in ("*", "+", "?"):
                part, i = f"(?:{part}){tokens[i]}", i + 1
            out.append(part)
        return "".join(out), i

    if "root" not in rules:
        raise ValueError("grammar has no root rule")
    return re.compile(alternatives(rules["root"], 0, ("root",))[0])


# The spec's structured-output examples, sent exactly as documented.
PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                   "city": {"type": "string"}},
    "required": ["name", "age", "city"],
}
EMAIL_REGEX = r"\w+@\w+\.com"
SENTIMENTS = ["Positive", "Negative", "Neutral"]
SQL_GRAMMAR = ('root ::= "SELECT " column " FROM " table\n'
               'column ::= "id" | "name"\n'
               'table ::= "users" | "orders"')
NAME_AGE_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
SHORT_TOKENS = 16  # plain answers: enough to see text, cheap on a GPU
STRUCTURED_TOKENS = 256  # a safety cap; an enforced constraint ends well before it


# ## The conformance suite


class CheckFailed(Exception):
    """A check's verdict with its reason (the request itself worked)."""


class KeyRejected(CheckFailed):
    """The endpoint answered 401/403 to our own key: no model check can pass."""


@dataclass
class CheckResult:
    check: str
    model: str  # a model key, or "" for the endpoint-wide checks
    passed: bool
    latency_s: float | None = None  # the check's own requests, cold-start waits excluded
    waited_s: float = 0.0  # cold start: time spent retrying before the answers came
    reason: str = ""
    key_rejected: bool = False

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "key_rejected"}


class _Probe:
    """One check's requests: sums their latency and cold-start waits."""

    def __init__(self, endpoint: Endpoint):
        self.endpoint = endpoint
        self.latency = self.waited = 0.0
        self.timed = False

    async def call(self, method: str, path: str, body: dict | None = None, *, key=OWN_KEY,
                   expect: int | None = 200) -> Answer:
        answer = await self.endpoint.send(method, path, body, key=key)
        self._add(answer)
        if expect == 200 and key is OWN_KEY and answer.status in (401, 403):
            raise KeyRejected(f"the endpoint rejected the API key: HTTP {answer.status}: "
                              f"{error_message(answer.resp)}")
        if expect is not None and answer.status != expect:
            raise CheckFailed(f"{method} {path}: HTTP {answer.status}: {error_message(answer.resp)}")
        return answer

    def _add(self, answer: Answer) -> None:
        self.latency += answer.latency
        self.waited += answer.waited
        self.timed = True


def _first_choice(answer: Answer) -> dict:
    data = answer.json()
    choices = data.get("choices") if isinstance(data, dict) else None
    if not choices or not isinstance(choices[0], dict):
        raise CheckFailed("the answer has no choices")
    return choices[0]


def _content(answer: Answer) -> tuple[str, str]:
    """The text of a chat or text completion's first choice, and its finish reason."""
    choice = _first_choice(answer)
    text = choice["message"].get("content") if isinstance(choice.get("message"), dict) else \
        choice.get("text")
    if not isinstance(text, str):
        raise CheckFailed("the answer's first choice has no text")
    return text, str(choice.get("finish_reason"))


def _shown(text: str, finish: str) -> str:
    cut = " (cut off at max_tokens)" if finish == "length" else ""
    return f"got {_clip(repr(text), 80)}{cut}"


def _chat(model: config.Model, prompt: str, **extra) -> dict:
    return {"model": model.name, "messages": [{"role": "user", "content": prompt}], **extra}


async def check_health(probe: _Probe) -> None:
    await probe.call("GET", "/health", key=None)


V1_ROUTES = (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"))


async def _check_auth(probe: _Probe, model: config.Model, key) -> None:
    bodies = {"/v1/chat/completions": _chat(model, "Hello!", max_tokens=1),
              "/v1/completions": {"model": model.name, "prompt": "Hello", "max_tokens": 1}}
    wrong = []
    for method, path in V1_ROUTES:
        answer = await probe.call(method, path, bodies.get(path), key=key, expect=None)
        if answer.status != 401:
            wrong.append(f"{method} {path} answered {answer.status}")
    if wrong:
        raise CheckFailed("expected 401: " + "; ".join(wrong))


async def check_models(probe: _Probe, expected: list[config.Model],
                       serving: set[str] | None = None) -> str | None:
    """The listing holds exactly the app's models. With `serving` (a set to fill: an endpoint
    that is not Modal's, e.g. --serve-local in front of the servers someone runs), it may
    list only some of them: those are what the suite then tests, and the rest are named."""
    data = (await probe.call("GET", "/v1/models")).json()
    listing = data.get("data") if isinstance(data, dict) else None
    if not isinstance(listing, list):
        raise CheckFailed("the listing has no data list")
    entries = [m for m in listing if isinstance(m, dict)]
    by_alias = {a.lower(): m.key for m in expected for a in m.aliases}
    # LoRA adapters are listed too, each with its base model as parent: not models of their own.
    listed = [m.get("id") for m in entries if str(m.get("parent")).lower() not in by_alias]
    found = {by_alias.get(str(i).lower()) for i in listed}
    missing = [m.name for m in expected if m.key not in found]
    extra = [str(i) for i in listed if str(i).lower() not in by_alias]
    if serving is not None and missing and not extra and len(missing) < len(expected):
        serving.update(m.key for m in expected if m.key in found)
        return (f"lists {len(expected) - len(missing)} of the app's {len(expected)} models; "
                f"not served here (not tested): {', '.join(missing)}")
    problems = ([f"missing {', '.join(missing)}"] if missing else []) + \
        ([f"not expected {', '.join(extra)}"] if extra else [])
    if problems:
        raise CheckFailed("; ".join(problems))
    if serving is not None:
        serving.update(found)
    return None


async def check_chat(probe: _Probe, model: config.Model) -> None:
    text, _ = _content(await probe.call("POST", "/v1/chat/completions",
                                        _chat(model, "Hello!", max_tokens=SHORT_TOKENS)))
    if not text.strip():
        raise CheckFailed("empty reply")


async def check_adapter(probe: _Probe, model: config.Model, adapter: config.Adapter) -> None:
    """A LoRA adapter answers under its own name, through its base model's pool."""
    body = {**_chat(model, "Hello!", max_tokens=SHORT_TOKENS), "model": adapter.name}
    answer = await probe.call("POST", "/v1/chat/completions", body)
    text, _ = _content(answer)
    if not text.strip():
        raise CheckFailed("empty reply")
    served = answer.json().get("model")
    if str(served).lower() != adapter.name.lower():
        raise CheckFailed(f"answered as '{served}', not the adapter '{adapter.name}'")


async def check_completion(probe: _Probe, model: config.Model) -> None:
    body = {"model": model.name, "prompt": "The capital of France is", "max_tokens": SHORT_TOKENS}
    text, _ = _content(await probe.call("POST", "/v1/completions", body))
    if not text.strip():
        raise CheckFailed("empty completion")


async def check_completion_echo(probe: _Probe, model: config.Model) -> None:
    prompt = "Once upon a time"
    body = {"model": model.name, "prompt": prompt, "max_tokens": SHORT_TOKENS, "echo": True}
    text, finish = _content(await probe.call("POST", "/v1/completions", body))
    if not text.startswith(prompt) or len(text) <= len(prompt):
        raise CheckFailed(f"expected the prompt followed by a completion; {_shown(text, finish)}")


async def check_chat_stream(probe: _Probe, model: config.Model) -> None:
    body = _chat(model, "Hello!", max_tokens=SHORT_TOKENS, stream=True,
                 stream_options={"include_usage": True})
    answer = await probe.endpoint.send("POST", "/v1/chat/completions", body, stream=True)
    chunks, usage, done, text = 0, None, False, ""
    try:
        if answer.status != 200:
            await answer.resp.aread()
            raise CheckFailed(f"HTTP {answer.status}: {error_message(answer.resp)}")
        async for line in answer.resp.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators and ": keep-alive" comments
            data = line[5:].strip()
            if done:
                raise CheckFailed("data after [DONE]")
            if data == "[DONE]":
                done = True
                continue
            event = json.loads(data)
            if "error" in event:
                err = event["error"]
                err = err.get("message", err) if isinstance(err, dict) else err
                raise CheckFailed(f"the stream broke off after {chunks} chunk(s) with an error "
                                  f"event: {_clip(str(err))}")
            if event.get("choices"):
                chunks += 1
                text += (event["choices"][0].get("delta") or {}).get("content") or ""
            if event.get("usage"):
                usage = event["usage"]
    except httpx.HTTPError as exc:
        raise CheckFailed(f"the stream broke off after {chunks} chunk(s): "
                          f"{type(exc).__name__}") from None
    except ValueError:
        raise CheckFailed(f"a chunk is not JSON after {chunks} chunk(s)") from None
    finally:
        await answer.resp.aclose()
        answer.latency = time.monotonic() - answer.sent  # the whole stream, to [DONE]
        probe._add(answer)
    if not chunks or not text:
        raise CheckFailed("no content chunks arrived")
    if not done:
        raise CheckFailed(f"the stream ended without [DONE] after {chunks} chunk(s)")
    if not isinstance(usage, dict) or not isinstance(usage.get("completion_tokens"), int):
        raise CheckFailed("no usage reported (stream_options.include_usage)")


def _parse_json(text: str, finish: str):
    try:
        return json.loads(text)
    except ValueError:
        raise CheckFailed(f"not JSON; {_shown(text, finish)}") from None


async def check_json_object(probe: _Probe, model: config.Model) -> None:
    body = _chat(model, "List 3 colors as JSON", response_format={"type": "json_object"},
                 max_tokens=STRUCTURED_TOKENS)
    text, finish = _content(await probe.call("POST", "/v1/chat/completions", body))
    if not isinstance(_parse_json(text, finish), dict):
        raise CheckFailed(f"JSON but not an object; {_shown(text, finish)}")


def _validate(schema: dict, text: str, finish: str) -> None:
    errors = schema_errors(schema, _parse_json(text, finish))
    if errors:
        raise CheckFailed(f"does not match the schema ({'; '.join(errors[:3])}); "
                          f"{_shown(text, finish)}")


async def check_json_schema(probe: _Probe, model: config.Model) -> None:
    body = _chat(model, "Extract: John is 30 years old and lives in NYC",
                 response_format={"type": "json_schema",
                                  "json_schema": {"name": "person", "schema": PERSON_SCHEMA}},
                 max_tokens=STRUCTURED_TOKENS)
    text, finish = _content(await probe.call("POST", "/v1/chat/completions", body))
    _validate(PERSON_SCHEMA, text, finish)


async def check_regex(probe: _Probe, model: config.Model) -> None:
    body = _chat(model, "Generate an email for Alan Turing at Enigma",
                 structured_outputs={"regex": EMAIL_REGEX}, max_tokens=STRUCTURED_TOKENS)
    text, finish = _content(await probe.call("POST", "/v1/chat/completions", body))
    if not re.fullmatch(EMAIL_REGEX, text):
        raise CheckFailed(f"does not fully match {EMAIL_REGEX}; {_shown(text, finish)}")


async def check_choice(probe: _Probe, model: config.Model) -> None:
    body = _chat(model, "Classify: vLLM is wonderful!",
                 structured_outputs={"choice": SENTIMENTS}, max_tokens=STRUCTURED_TOKENS)
    text, finish = _content(await probe.call("POST", "/v1/chat/completions", body))
    if text not in SENTIMENTS:
        raise CheckFailed(f"not one of {', '.join(SENTIMENTS)}; {_shown(text, finish)}")


async def check_grammar(probe: _Probe, model: config.Model) -> None:
    body = _chat(model, "Generate a SQL query", structured_outputs={"grammar": SQL_GRAMMAR},
                 max_tokens=STRUCTURED_TOKENS)
    text, finish = _content(await probe.call("POST", "/v1/chat/completions", body))
    if not grammar_regex(SQL_GRAMMAR).fullmatch(text):
        raise CheckFailed("not in the grammar's language (SELECT id|name FROM users|orders); "
                          + _shown(text, finish))


async def check_completion_json(probe: _Probe, model: config.Model) -> None:
    body = {"model": model.name, "prompt": "Generate a person object:",
            "structured_outputs": {"json": NAME_AGE_SCHEMA}, "max_tokens": STRUCTURED_TOKENS}
    text, finish = _content(await probe.call("POST", "/v1/completions", body))
    _validate(NAME_AGE_SCHEMA, text, finish)


# Per model, in this order: the first plain request absorbs the model's cold start.
MODEL_CHECKS = {
    "chat": check_chat,
    "completion": check_completion,
    "completion.echo": check_completion_echo,
    "chat.stream": check_chat_stream,
    "structured.json_object": check_json_object,
    "structured.json_schema": check_json_schema,
    "structured.regex": check_regex,
    "structured.choice": check_choice,
    "structured.grammar": check_grammar,
    "structured.completion_json": check_completion_json,
}
ENDPOINT_CHECKS = ("health", "auth.no-key", "auth.wrong-key", "models")


async def _run_check(endpoint: Endpoint, name: str, model_key: str, check, *args) -> CheckResult:
    probe = _Probe(endpoint)
    result = CheckResult(name, model_key, False)
    try:
        result.reason = await check(probe, *args) or ""  # a check may note something on a pass
        result.passed = True
    except CheckFailed as exc:
        result.reason = str(exc)
        result.key_rejected = isinstance(exc, KeyRejected)
    except NotReady as exc:
        result.reason = f"not ready: {exc}"
    except httpx.HTTPError as exc:
        result.reason = f"{type(exc).__name__}: {_clip(str(exc))}"
    except (LookupError, TypeError, AttributeError) as exc:  # JSON of another shape than OpenAI's
        result.reason = f"malformed answer ({type(exc).__name__}: {_clip(str(exc))})"
    result.latency_s = probe.latency if probe.timed else None
    result.waited_s = probe.waited
    return result


@dataclass
class Target:
    """What to test: an app (for its models and prices), where it answers, and with which key."""

    app: plan.App
    models: list[config.Model]  # the models to exercise (all the app's, or --test-model)
    base_url: str
    api_key: str | None = field(repr=False)
    deadline_s: float
    defaults: config.Defaults  # the matrix's: scaledown window, inputs per replica
    # A --base-url that is not a Modal endpoint (your own servers behind --serve-local) may
    # serve some of the app's models: the suite tests those it lists (see check_models).
    listed_only: bool = False

    @property
    def expected(self) -> list[config.Model]:
        return [p.model for p in self.app.pools]

    def endpoint(self, **options) -> Endpoint:
        return Endpoint(self.base_url, self.api_key, deadline_s=self.deadline_s, **options)


def resolve_target(matrix: config.Matrix, app: plan.App, *, test_model: str | None,
                   base_url: str | None, api_key: str | None, deadline_s: float | None,
                   environment: str | None = None, require_key: bool = False) -> Target:
    """The app's models (or the one named), and its URL: `--base-url`, else Modal's lookup.
    Every usage error (`require_key`: a missing key) comes before that lookup."""
    served = [p.model for p in app.pools]
    if not served:
        raise config.UsageError(f"{app.name} serves no model: none fits on {app.gpu.modal_gpu} "
                                "(uv run deploy.py --list shows the fit check)")
    models = served
    if test_model:
        model = matrix.resolve_model(test_model)
        if model not in served:
            raise config.UsageError(f"{app.name} does not serve '{test_model}'; it serves "
                                    f"{', '.join(m.key for m in served) or 'nothing'}")
        models = [model]
    if require_key and not api_key:
        raise config.UsageError("the suite needs the endpoint's key: --api-key KEY or "
                                "VLLM_API_KEY (in the environment or ./.env)")
    listed_only = False
    if base_url is None:
        import cloud  # the Modal lookup: imported only when no --base-url is given

        key = app.gpu.key if app.kind == "gpu" else config.legacy_key(served[0].key, app.gpu.key)
        base_url = cloud.endpoint_url(matrix, key, environment=environment)
    else:
        listed_only = not is_modal_url(normalize_base_url(base_url))
    return Target(app, models, normalize_base_url(base_url), api_key,
                  DEFAULT_DEADLINE if deadline_s is None else deadline_s, matrix.defaults,
                  listed_only)


async def run_suite(target: Target, on_result=None, on_wait=None) -> list[CheckResult]:
    """Every check against the target; models are checked in parallel, checks in order.
    `on_wait` is the Endpoint's (why the last try failed, while it retries)."""
    results: list[CheckResult] = []

    def record(result: CheckResult) -> CheckResult:
        results.append(result)
        if on_result is not None:
            on_result(result)
        return result

    wrong_key = "wrong-" + secrets.token_hex(8)
    first = target.models[0]
    async with target.endpoint(on_wait=on_wait) as endpoint:
        record(await _run_check(endpoint, "health", "", check_health))
        record(await _run_check(endpoint, "auth.no-key", "", _check_auth, first, None))
        record(await _run_check(endpoint, "auth.wrong-key", "", _check_auth, first, wrong_key))
        serving: set[str] | None = set() if target.listed_only else None
        listing = record(await _run_check(endpoint, "models", "", check_models, target.expected,
                                          serving))
        if listing.key_rejected:
            for model in target.models:
                record(CheckResult("(model checks)", model.key, False,
                                   reason="not run: the endpoint rejected the API key"))
            return results
        tested = target.models
        if serving:  # only what this endpoint lists; a model asked for by name must be there
            tested = [m for m in target.models if m.key in serving]
            if len(target.models) < len(target.expected):
                for model in target.models:
                    if model.key not in serving:
                        record(CheckResult("(model checks)", model.key, False, reason=(
                            "not run: this endpoint does not list it in /v1/models")))

        async def one_model(model: config.Model) -> None:
            for name, check in MODEL_CHECKS.items():
                record(await _run_check(endpoint, name, model.key, check, model))
            for adapter in model.adapters:
                record(await _run_check(endpoint, f"adapter.{adapter.name}", model.key,
                                        check_adapter, model, adapter))

        await asyncio.gather(*(one_model(m) for m in tested))
    order = {name: i for i, name in enumerate([*ENDPOINT_CHECKS, *MODEL_CHECKS])}
    models = {"": -1, **{m.key: i for i, m in enumerate(target.models)}}
    return sorted(results, key=lambda r: (models[r.model], order.get(r.check, len(order))))


def cold_starts(results: list[CheckResult]) -> dict[str, float]:
    """Seconds each model (and the endpoint, "") spent starting before it answered."""
    waits: dict[str, float] = {}
    for r in results:
        waits[r.model] = round(waits.get(r.model, 0.0) + r.waited_s, 3)
    return waits


# ## Presentation (rich on stderr while running; results on stdout)


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, emoji=False)


def progress():
    """A progress bar on stderr; it disappears when done, leaving stdout to the results."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    console = _console(stderr=True)
    # Not on a terminal, no bar at all: rich would end it with an empty line on stderr.
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                    MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                    transient=True, disable=not console.is_terminal)


class WaitNotes:
    """Why the endpoint does not answer yet, shown while the client waits (an Endpoint's
    `on_wait`): beside the progress bar's description on a terminal; otherwise one line on
    stderr when the reason changes, or when a minute has passed without another line;
    never a line per retry."""

    REPEAT_S = 60.0  # seconds: piped, the same reason again only after this long

    def __init__(self, bar, task, what: str):
        self.bar, self.task, self.what = bar, task, what
        self.started = time.monotonic()
        self.printed: tuple[str, float] | None = None  # (reason, when) of the last line

    def show(self, what: str) -> None:
        """What is being done now (a reason shown later follows it)."""
        self.what = what
        self.bar.update(self.task, description=what)

    def __call__(self, reason: str) -> None:
        from rich.markup import escape

        if self.bar.console.is_terminal:
            self.bar.update(self.task, description=f"{self.what} [dim]waiting: "
                                                   f"{escape(_clip(reason, 60))}[/dim]")
            return
        now = time.monotonic()
        if self.printed and self.printed[0] == reason and now - self.printed[1] < self.REPEAT_S:
            return
        self.printed = (reason, now)
        self.bar.console.print(f"waiting ({now - self.started:.0f} s so far): {escape(reason)}",
                               soft_wrap=True)


def table(title: str, columns: tuple[str, ...], *, wrap: str = "reason"):
    """A rich table titled on the left; only the `wrap` column wraps."""
    from rich.table import Table

    result = Table(title=title, title_justify="left")
    for column in columns:
        result.add_column(column, no_wrap=column != wrap)
    return result


def planned_checks(models: list[config.Model]) -> int:
    """How many checks the suite runs for these models (the progress bar's total)."""
    return len(ENDPOINT_CHECKS) + sum(len(MODEL_CHECKS) + len(m.adapters) for m in models)


def ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _mask(target: Target) -> str:
    import gateway

    return gateway.mask_key(target.api_key)


def run_conformance(target: Target, *, as_json: bool) -> int:
    """`--test-gpu` / `--test`: run the suite, print a table (or JSON); exit code 0 if all pass."""
    with progress() as bar:
        what = f"testing {target.app.name}"
        task = bar.add_task(what, total=planned_checks(target.models))
        notes = WaitNotes(bar, task, what)

        def advance(result: CheckResult) -> None:
            where = f" {result.model}" if result.model else ""
            bar.update(task, advance=1)
            notes.show(f"{result.check}{where}")

        results = asyncio.run(run_suite(target, advance, notes))
    passed = all(r.passed for r in results)
    waits = cold_starts(results)
    if as_json:
        sys.stdout.write(json.dumps({
            "app": target.app.name, "endpoint": target.base_url, "passed": passed,
            "cold_start_s": {k or "endpoint": v for k, v in waits.items()},
            "checks": [r.as_dict() for r in results]}, indent=2) + "\n")
        return 0 if passed else 1
    from rich.markup import escape

    console = _console()
    rows = table(f"{target.app.name} at {target.base_url} (key {_mask(target)})",
                 ("check", "model", "result", "latency", "reason"))
    for r in results:
        rows.add_row(r.check, r.model or "(endpoint)",
                     "[green]PASS[/green]" if r.passed else "[bold red]FAIL[/bold red]",
                     ms(r.latency_s), escape(r.reason))
    console.print(rows)
    slow = {k or "endpoint": v for k, v in waits.items() if v >= 0.05}
    console.print("Cold start (waited before the first answers, not in the latencies): "
                  + (", ".join(f"{k} {v:.1f} s" for k, v in slow.items()) or "none"))
    failed = [r for r in results if not r.passed]
    if failed:
        names = ", ".join(f"{r.check} ({r.model or 'endpoint'})" for r in failed)
        console.print(f"[bold red]FAILED[/bold red] {len(failed)} of {len(results)} checks: "
                      f"{escape(names)}", soft_wrap=True)
        return 1
    console.print(f"[green]All {len(results)} checks passed.[/green]")
    return 0


# ## Warm-up: a real one-token completion per model (a /health answer is not readiness)


@dataclass
class Wake:
    model: str
    ok: bool
    ready_after_s: float  # from the start of the warm-up to the first successful completion
    attempts: int = 0
    reason: str = ""


async def wake(endpoint: Endpoint, model: config.Model, start: float | None = None) -> Wake:
    """One-token completion, retried through the cold start until the deadline; ready
    after is counted from `start` (the warm-up's), else from now."""
    start = time.monotonic() if start is None else start
    body = {"model": model.name, "prompt": "Hi", "max_tokens": 1}
    try:
        answer = await endpoint.send("POST", "/v1/completions", body)
    except NotReady as exc:
        return Wake(model.key, False, time.monotonic() - start, reason=str(exc))
    except httpx.HTTPError as exc:
        return Wake(model.key, False, time.monotonic() - start, reason=type(exc).__name__)
    took = time.monotonic() - start
    if answer.status != 200:
        return Wake(model.key, False, took, answer.attempts,
                    f"HTTP {answer.status}: {error_message(answer.resp)}")
    try:
        _first_choice(answer)  # a 200 from something other than the model is not readiness
    except CheckFailed as exc:
        return Wake(model.key, False, took, answer.attempts, f"HTTP 200 without a completion: {exc}")
    return Wake(model.key, True, took, answer.attempts)


def ping_interval(scaledown_window_s: float) -> float:
    """Well inside the scaledown window: a third of it leaves room for a slow ping or two."""
    return max(1.0, scaledown_window_s / 3)


def replicas_usd_per_hour(target: Target) -> dict[str, float]:
    """What one warm replica of each target model costs per hour: GPUs + CPU + memory."""
    return {p.model.key: p.usd_per_hour for p in target.app.pools if p.model in target.models}


def warm_usd_per_hour_split(target: Target) -> dict[str, float]:
    """What keeping the target warm costs per hour, split: the replicas' GPUs, CPU and
    memory, and the GPU app's CPU router (the pings keep it up too; legacy apps have none)."""
    pools = [p for p in target.app.pools if p.model in target.models]
    split = {"gpu": 0.0, "cpu": 0.0, "memory": 0.0, "router": 0.0}
    for pool in pools:
        for part, usd in pool.bill.split().items():
            split[part] += usd
    if target.app.kind == "gpu" and pools:
        split["router"] = config.router_bill(pools[0].fit.billing).usd_per_hour
    return split


async def _keep_warm(target: Target, endpoint: Endpoint, seconds: float, interval: float,
                     on_tick) -> tuple[int, int]:
    """A round of pings every `interval` from the start (a slow round does not shift the
    next one), until `seconds` have passed."""
    start = time.monotonic()
    pings = failed = 0
    rounds = math.ceil(seconds / interval) - 1  # none at the end: the replicas are warm then
    for n in range(1, rounds + 1):
        await asyncio.sleep(max(0.0, start + n * interval - time.monotonic()))
        on_tick()
        endpoint.deadline = time.monotonic() + min(interval, endpoint.deadline_s)
        for w in await asyncio.gather(*(wake(endpoint, m) for m in target.models)):
            pings += 1
            failed += not w.ok
    await asyncio.sleep(max(0.0, start + seconds - time.monotonic()))
    on_tick()
    return pings, failed


async def _listed(endpoint: Endpoint, target: Target) -> set[str]:
    """The app's models your own endpoint lists (see Target.listed_only); empty when the
    listing cannot be read or holds something else (then every model is woken, and the
    answers say why one fails)."""
    serving: set[str] = set()
    try:
        await check_models(_Probe(endpoint), target.expected, serving)
    except (CheckFailed, NotReady, httpx.HTTPError, LookupError, TypeError, AttributeError):
        return set()
    return serving


def warm_endpoint(target: Target, *, keep_warm_s: float | None, scaledown_window_s: float,
                  as_json: bool) -> int:
    """`--warm [--keep-warm]`: wake every model in parallel; optionally keep pinging."""
    interval = ping_interval(scaledown_window_s)
    not_served: list[str] = []

    async def run() -> tuple[list[Wake], tuple[int, int] | None]:
        nonlocal target
        began = time.monotonic()
        async with target.endpoint() as endpoint:
            with progress() as bar:
                what = f"waking {len(target.models)} model(s) of {target.app.name}"
                task = bar.add_task(what, total=len(target.models))
                endpoint.on_wait = notes = WaitNotes(bar, task, what)
                # Your own endpoint may serve part of the app: wake what it lists (as the
                # suite tests it); a model named with --test-model is woken whatever is listed.
                if target.listed_only and len(target.models) == len(target.expected):
                    listed = await _listed(endpoint, target)
                    if listed:
                        not_served.extend(m.key for m in target.models if m.key not in listed)
                        target = replace(target, models=[m for m in target.models
                                                         if m.key in listed])
                        bar.update(task, total=len(target.models))

                async def one(model):
                    w = await wake(endpoint, model, began)
                    bar.update(task, advance=1)
                    notes.show(f"{model.key} ready" if w.ok else f"{model.key} failed")
                    return w

                woken = list(await asyncio.gather(*(one(m) for m in target.models)))
            if not keep_warm_s or not all(w.ok for w in woken):
                return woken, None
            if not as_json:
                _say_keep_warm(target, keep_warm_s, interval)
            with progress() as bar:
                task = bar.add_task("keeping warm", total=keep_warm_s)
                endpoint.on_wait = WaitNotes(bar, task, "keeping warm")
                started = time.monotonic()

                def tick():
                    bar.update(task, completed=min(keep_warm_s, time.monotonic() - started))

                kept = await _keep_warm(target, endpoint, keep_warm_s, interval, tick)
            return woken, kept

    woken, kept = asyncio.run(run())
    ok = all(w.ok for w in woken) and (kept is None or kept[1] == 0)
    split = warm_usd_per_hour_split(target)
    per_hour = round(sum(split.values()), 2)
    # After the last ping the replicas idle for the scaledown window, billed all the same.
    usd, tail = (per_hour * s / 3600 for s in (keep_warm_s or 0, scaledown_window_s))
    if as_json:
        data = {"app": target.app.name, "endpoint": target.base_url, "passed": ok,
                "models": [asdict(w) for w in woken], "not_served": not_served}
        if kept is not None:
            data["keep_warm"] = {"seconds": keep_warm_s, "interval_s": interval,
                                 "usd_per_hour": per_hour,
                                 "usd_per_hour_split": {k: round(v, 4) for k, v in split.items()},
                                 "pings": kept[0],
                                 "failed_pings": kept[1], "usd": round(usd, 4),
                                 "scaledown_window_s": scaledown_window_s,
                                 "usd_scaledown_tail": round(tail, 4)}
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return 0 if ok else 1
    from rich.markup import escape

    console = _console()
    rows = table(f"Warm-up of {target.app.name} at {target.base_url}",
                 ("model", "result", "ready after", "attempts", "reason"))
    for w in woken:
        rows.add_row(w.model, "[green]ready[/green]" if w.ok else "[bold red]FAIL[/bold red]",
                     f"{w.ready_after_s:.1f} s", str(w.attempts or "-"), escape(w.reason))
    console.print(rows)
    console.print("Ready after: from the start of the warm-up to the first one-token completion "
                  "(the cold start included).")
    if not_served:
        console.print(f"Not served at {target.base_url} (not woken): {', '.join(not_served)}.",
                      soft_wrap=True, markup=False)
    if kept is not None:
        console.print(f"Kept warm for {keep_warm_s:g} s: {kept[0]} pings, {kept[1]} failed; "
                      f"about ${usd:.2f} at ${per_hour:.2f}/hour, plus up to ${tail:.2f} while "
                      f"the replicas idle out the {scaledown_window_s:g} s scaledown window.",
                      soft_wrap=True)
    return 0 if ok else 1


def _say_keep_warm(target: Target, seconds: float, interval: float) -> None:
    costs = replicas_usd_per_hour(target)
    split = warm_usd_per_hour_split(target)
    detail = ", ".join(f"{k} ${v:.2f}/h" for k, v in costs.items())
    if split["router"]:
        detail += f", the CPU router ${split['router']:.2f}/h"
    parts = (f"${split['gpu']:.2f} GPU + ${split['cpu']:.2f} CPU + "
             f"${split['memory']:.2f} memory" + (f" + ${split['router']:.2f} router"
                                                 if split["router"] else ""))
    _console(stderr=True).print(
        f"Keeping {len(costs)} replica(s) warm for {seconds:g} s, a ping every {interval:g} s: "
        f"${sum(split.values()):.2f}/hour while it runs ({detail}; one replica per model; "
        f"{parts}), billed until the scaledown window after the last ping has passed.",
        soft_wrap=True)
