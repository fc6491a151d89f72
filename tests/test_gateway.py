"""The gateway over real loopback HTTP: the official openai SDK as client, stand-ins of
vLLM 0.33 as backends, each a real uvicorn server on a free port."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import socket

import httpx
import openai
import pytest
from servers import HOST, ThreadServer, wait_until
from standin import StandIn, standin_server

import config
import gateway

KEY = "sk-test-" + secrets.token_hex(16)
G12, G27 = "google/gemma-3-12b-it", "google/gemma-3-27b-it"
PERSON = {"type": "object", "required": ["name", "age", "city"], "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"}}}
SQL = 'root ::= "SELECT " column " FROM " table\ncolumn ::= "id" | "name"\ntable ::= "users" | "orders"'
HELLO = [{"role": "user", "content": "Hello!"}]


def start_gateway(matrix, urls: dict[str, str], **options):
    """A gateway server in front of `urls` (model key -> base URL); the others unavailable."""
    backend = gateway.HTTPBackend(urls, **options.pop("backend", {}))
    served = [matrix.models[k] for k in urls]
    unavailable = {k: "does not fit on L40S: needs 2 GPUs" for k in matrix.models if k not in urls}
    app = gateway.build_app(served, backend, api_key=options.pop("api_key", KEY),
                            unavailable=unavailable, **options)
    return ThreadServer(app)


@pytest.fixture(scope="module")
def stack(matrix):
    """Two stand-ins (one per model) behind one gateway; qwen3-vl-30b is 'unavailable'."""
    a, b = StandIn([G12]), StandIn([G27])
    with ThreadServer(a) as sa, ThreadServer(b) as sb, \
            start_gateway(matrix, {"gemma-3-12b": sa.url, "gemma-3-27b": sb.url + "/v1/"}) as gw:
        yield {"a": a, "b": b, "url": gw.url}


@pytest.fixture
def env(stack):
    for standin in (stack["a"], stack["b"]):
        standin.received.clear()
        standin.disconnects.clear()
    return stack


def sdk(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=10)


def raw(url: str, key: str | None = KEY) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=url, headers=headers, timeout=10)


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert KEY not in response.text
    return error


# ## Routes, routing, the SDK's everyday calls


def test_health_needs_no_key_and_reveals_nothing(env):
    response = raw(env["url"], key=None).get("/health")
    assert response.status_code == 200 and response.json()["status"] == "ok"
    assert KEY not in response.text and "gemma" not in response.text
    assert raw(env["url"], key=None).head("/health").status_code == 200


def test_models_lists_served_names_with_short_aliases(env):
    ids = [m.id for m in sdk(env["url"]).models.list()]
    assert ids == [G12, G27]
    data = raw(env["url"]).get("/v1/models").json()["data"]
    assert data[0]["aliases"] == ["gemma-3-12b"] and data[1]["aliases"] == ["gemma-3-27b"]


@pytest.mark.parametrize("name", [G12, "gemma-3-12b", "GEMMA-3-12B", " Google/Gemma-3-12B-IT "])
def test_any_alias_reaches_its_backend_under_the_canonical_name(env, name):
    reply = sdk(env["url"]).chat.completions.create(model=name, messages=HELLO, max_tokens=100)
    assert reply.model == G12 and "Hello!" in reply.choices[0].message.content
    assert env["a"].last_body["model"] == G12 and not env["b"].received


def test_each_model_goes_to_its_own_backend(env):
    sdk(env["url"]).chat.completions.create(model="gemma-3-27b", messages=HELLO)
    assert env["b"].last_body["model"] == G27 and not env["a"].received
    assert env["b"].received[-1]["path"] == gateway.CHAT


def test_text_completions_with_echo(env):
    reply = sdk(env["url"]).completions.create(model="gemma-3-12b", prompt="Once upon a time",
                                               max_tokens=100, echo=True)
    assert reply.choices[0].text.startswith("Once upon a time")
    assert env["a"].last_body == {"model": G12, "prompt": "Once upon a time",
                                  "max_tokens": 100, "echo": True}


def test_chat_stream_arrives_chunk_by_chunk_with_usage(env):
    client = sdk(env["url"])
    whole = client.chat.completions.create(model="gemma-3-12b", messages=HELLO)
    chunks = list(client.chat.completions.create(
        model="gemma-3-12b", messages=HELLO, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert len(chunks) > 4 and chunks[-1].usage.completion_tokens == len(text.split())


def test_completion_stream(env):
    chunks = list(sdk(env["url"]).completions.create(
        model="gemma-3-27b", prompt="The capital of France is", max_tokens=50, stream=True))
    assert "".join(c.choices[0].text for c in chunks).startswith("This is the stand-in")
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_spec_curl_bodies_work_as_written(env):
    """The user's curl examples, body for body (only the host differs)."""
    bodies = [
        (gateway.CHAT, {"model": G12, "messages": HELLO, "max_tokens": 100}),
        (gateway.CHAT, {"model": "gemma-3-12b", "messages": HELLO, "max_tokens": 100}),
        (gateway.COMPLETIONS, {"model": "gemma-3-12b", "prompt": "The capital of France is",
                               "max_tokens": 50}),
        (gateway.CHAT, {"model": "gemma-3-12b", "messages": HELLO,
                        "response_format": {"type": "json_object"}}),
        (gateway.CHAT, {"model": "gemma-3-12b", "messages": HELLO, "response_format": {
            "type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}}),
        (gateway.CHAT, {"model": "gemma-3-12b", "messages": HELLO,
                        "structured_outputs": {"regex": "\\w+@\\w+\\.com"}}),
        (gateway.CHAT, {"model": "gemma-3-12b", "messages": HELLO,
                        "structured_outputs": {"choice": ["Positive", "Negative", "Neutral"]}}),
        (gateway.CHAT, {"model": "gemma-3-12b", "messages": HELLO,
                        "structured_outputs": {"grammar": SQL}}),
        (gateway.COMPLETIONS, {"model": "gemma-3-12b", "prompt": "Generate a person object:",
                               "structured_outputs": {"json": PERSON}}),
    ]
    with raw(env["url"]) as client:
        for path, body in bodies:
            response = client.post(path, content=json.dumps(body),
                                   headers={"Content-Type": "application/json"})
            assert response.status_code == 200, (body, response.text)
            assert env["a"].last_body == {**body, "model": G12}  # untouched but for the name
        assert client.get("/v1/models").status_code == 200


# ## Structured outputs


def content(reply) -> str:
    choice = reply.choices[0]
    return choice.message.content if hasattr(choice, "message") else choice.text


def test_response_format_json_schema_passes_through(env):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    reply = sdk(env["url"]).chat.completions.create(
        model="gemma-3-12b", messages=HELLO, response_format=fmt)
    person = json.loads(reply.choices[0].message.content)
    assert isinstance(person["name"], str) and isinstance(person["age"], int)
    assert env["a"].last_body["response_format"] == fmt


def first_key(value) -> str:
    return next(iter(value), "") if isinstance(value, dict) else ""


CONSTRAINED = [
    ({"json": PERSON}, lambda text: set(json.loads(text)) == {"name", "age", "city"}),
    ({"regex": r"\w+@\w+\.com"}, lambda text: re.fullmatch(r"\w+@\w+\.com", text)),
    ({"choice": ["Positive", "Negative"]}, lambda text: text in ("Positive", "Negative")),
    ({"grammar": SQL}, lambda text: re.fullmatch("SELECT (id|name) FROM (users|orders)", text)),
    ({"json_object": True}, lambda text: isinstance(json.loads(text), dict)),
]


@pytest.mark.parametrize("constraint,check", CONSTRAINED, ids=first_key)
@pytest.mark.parametrize("route", ["chat", "completions"])
def test_structured_outputs_pass_through_untouched(env, route, constraint, check):
    client = sdk(env["url"])
    extra = {"structured_outputs": constraint}
    if route == "chat":
        reply = client.chat.completions.create(model="gemma-3-12b", messages=HELLO,
                                               extra_body=extra)
    else:
        reply = client.completions.create(model="gemma-3-12b", prompt="Go:", extra_body=extra)
    assert check(content(reply))
    assert env["a"].last_body["structured_outputs"] == constraint


LEGACY = [
    ({"guided_json": PERSON, "guided_decoding_backend": "xgrammar"}, {"json": PERSON},
     CONSTRAINED[0][1]),
    ({"guided_regex": r"\w+@\w+\.com"}, {"regex": r"\w+@\w+\.com"}, CONSTRAINED[1][1]),
    ({"guided_choice": ["Positive", "Negative"]}, {"choice": ["Positive", "Negative"]},
     CONSTRAINED[2][1]),
    ({"guided_grammar": SQL}, {"grammar": SQL}, CONSTRAINED[3][1]),
    ({"guided_choice": ["yes"], "structured_outputs": {"disable_any_whitespace": True}},
     {"choice": ["yes"], "disable_any_whitespace": True}, lambda text: text == "yes"),
]


@pytest.mark.parametrize("legacy,expected,check", LEGACY, ids=first_key)
@pytest.mark.parametrize("route", ["chat", "completions"])
def test_legacy_guided_fields_become_structured_outputs(env, route, legacy, expected, check):
    client = sdk(env["url"])
    if route == "chat":
        reply = client.chat.completions.create(model="gemma-3-12b", messages=HELLO,
                                               extra_body=legacy)
    else:
        reply = client.completions.create(model="gemma-3-12b", prompt="Go:", extra_body=legacy)
    assert check(content(reply))
    received = env["a"].last_body
    assert received["structured_outputs"] == expected
    assert not [k for k in received if k.startswith("guided_")]


def test_standin_like_vllm_ignores_legacy_fields_sent_directly(env):
    """Why the translation exists: vLLM >= 0.12 answers guided_* with unconstrained text."""
    with ThreadServer(StandIn([G12])) as direct:
        reply = sdk(direct.url).chat.completions.create(
            model=G12, messages=HELLO, extra_body={"guided_choice": ["Positive", "Negative"]})
    assert reply.choices[0].message.content not in ("Positive", "Negative")


@pytest.mark.parametrize("extra", [
    {"guided_json": PERSON, "guided_regex": "a+"},
    {"guided_choice": ["a"], "structured_outputs": {"regex": "a+"}},
    {"guided_json": PERSON, "response_format": {"type": "json_object"}},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
     "structured_outputs": {"choice": ["a"]}},
    {"structured_outputs": {"choice": ["a"], "regex": "a+"}},
    {"guided_regex": "a+", "structured_outputs": "regex"},
])
def test_conflicting_constraints_are_a_400(env, extra):
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(env["url"]).chat.completions.create(model="gemma-3-12b", messages=HELLO,
                                                extra_body=extra)
    assert caught.value.body["param"] == "structured_outputs"
    assert not env["a"].received


# ## Authentication


def test_wrong_key_is_an_authentication_error(env):
    for key in ("wrong", KEY[:-1], KEY + "x", KEY.upper()):
        with pytest.raises(openai.AuthenticationError) as caught:
            sdk(env["url"], key=key).chat.completions.create(model="gemma-3-12b", messages=HELLO)
        assert caught.value.response.headers["www-authenticate"].startswith("Bearer")
        assert KEY not in caught.value.response.text
    assert not env["a"].received


@pytest.mark.parametrize("header", [None, "Basic " + KEY, "Bearer", f"Bearer {KEY} extra",
                                    "Bearer" + KEY, KEY, "Token " + KEY],
                         ids=["none", "basic", "no-token", "extra", "no-space", "bare", "token"])
@pytest.mark.parametrize("path", ["/v1/models", gateway.CHAT, gateway.COMPLETIONS])
def test_missing_or_malformed_authorization_is_401(env, header, path):
    headers = {"Authorization": header} if header is not None else {}
    with raw(env["url"], key=None) as client:
        response = client.request("GET" if path == "/v1/models" else "POST", path,
                                  headers=headers, json={"model": "gemma-3-12b", "prompt": "x"})
    assert_openai_error(response, 401)
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert not env["a"].received


def test_repeated_authorization_headers_are_refused(env):
    with raw(env["url"], key=None) as client:
        response = client.get("/v1/models", headers=[("Authorization", f"Bearer {KEY}"),
                                                     ("Authorization", "Bearer other")])
    assert_openai_error(response, 401)


def test_scheme_is_case_insensitive(env):
    with raw(env["url"], key=None) as client:
        assert client.get("/v1/models", headers={"Authorization": f"bearer {KEY}"}).is_success


def test_no_key_refuses_to_start_unless_explicitly_unauthenticated(matrix, env):
    backend = gateway.HTTPBackend({})
    with pytest.raises(config.UsageError):
        gateway.build_app([matrix.models["gemma-3-12b"]], backend, api_key=None)
    with pytest.raises(config.UsageError):
        gateway.build_app([matrix.models["gemma-3-12b"]], backend, api_key="")
    app = gateway.build_app([matrix.models["gemma-3-12b"]],
                            gateway.HTTPBackend({"gemma-3-12b": "http://127.0.0.1:9"}),
                            api_key=None, allow_unauthenticated=True)
    with ThreadServer(app) as open_gw:
        assert raw(open_gw.url, key=None).get("/v1/models").status_code == 200


def test_api_key_from_env(monkeypatch):
    assert gateway.api_key_from_env() is None
    monkeypatch.setenv("API_KEY", "k")
    assert gateway.api_key_from_env() == "k"
    assert gateway.mask_key("sk-" + "x" * 20 + "abcd") == "sk-…abcd"
    assert "short" not in gateway.mask_key("shortkey")


# ## Everything else is 404 and never forwarded


@pytest.mark.parametrize("path", [
    "/docs", "/redoc", "/openapi.json", "/invocations", "/tokenize", "/detokenize", "/metrics",
    "/sleep", "/wake_up", "/v1/load_lora_adapter", "/v1/embeddings", "/v1/responses", "/",
    "/v1/chat/completions/", "/v1//completions", "/V1/models", "/health/x",
    "/v1/models/google/gemma-3-12b-it", "/pooling", "/is_sleeping", "/version"])
def test_other_paths_are_404_and_never_forwarded(env, path):
    with raw(env["url"]) as client:
        for method in ("GET", "POST"):
            response = client.request(method, path, json={"model": "gemma-3-12b"})
            assert_openai_error(response, 404)
    assert not env["a"].received and not env["b"].received


def test_wrong_method_on_a_route_is_405(env):
    with raw(env["url"]) as client:
        assert_openai_error(client.get(gateway.CHAT), 405)
        assert_openai_error(client.post("/v1/models"), 405)


# ## Validation and model errors


def test_unknown_model_is_404_listing_the_served_names(env):
    with pytest.raises(openai.NotFoundError) as caught:
        sdk(env["url"]).chat.completions.create(model="llama-4", messages=HELLO)
    assert G12 in caught.value.message and G27 in caught.value.message
    assert caught.value.body["param"] == "model"


def test_model_not_served_on_this_gpu_says_why(env):
    with pytest.raises(openai.NotFoundError) as caught:
        sdk(env["url"]).completions.create(model="Qwen3-VL-30B", prompt="x")
    assert "does not fit on L40S" in caught.value.message


@pytest.mark.parametrize("body,status", [
    (b"{not json", 400), (b"[1, 2]", 400), (b'"text"', 400), (b"", 400), (b"\xff\xfe", 400),
    (b"[" * 100_000, 400), (b'{"messages": []}', 400), (b'{"model": 12}', 400),
    (b'{"model": null}', 400), (b'{"model": ["gemma-3-12b"]}', 400),
    (b'{"model": "gemma-3-12b", "messages": [], "max_tokens": 0}', 400),
    # Past msgspec's range or UTF-8: these were 500s in uvicorn's plain text, not JSON.
    (b'{"model": "gemma-3-12b", "messages": [], "n": 1e400}', 400),
    (b'{"model": "gemma-3-12b", "messages": [], "stream": -1e400}', 400),
    ((b'{"model": "gemma-3-12b", "messages": [], "response_format": {"type": 1e400},'
      b' "guided_choice": ["a"]}'), 400),
    (b'{"model": "gemma\xff", "messages": []}', 400), (b'{"\xff": 1}', 400),
    (b'{"model": "gemma-3-12b", "messages": [], "structured_outputs": {"\xff": 1}}', 400),
])
def test_invalid_bodies_are_openai_shaped_4xx(env, body, status):
    with raw(env["url"]) as client:
        assert_openai_error(client.post(gateway.CHAT, content=body), status)


@pytest.mark.parametrize(("extra", "param"), [
    ({"kv_transfer_params": {"remote_host": "10.0.0.1", "remote_port": 5557}},
     "kv_transfer_params"),
    ({"vllm_xargs": {"plugin": "x"}}, "vllm_xargs"),
    ({"kv_transfer_params": None}, "kv_transfer_params"),
    ({"n": 129}, "n"),
])
@pytest.mark.parametrize("path", [gateway.CHAT, gateway.COMPLETIONS])
def test_server_steering_fields_and_huge_n_are_refused(env, extra, param, path):
    body = {"model": "gemma-3-12b", "messages": HELLO, "prompt": "x", **extra}
    with raw(env["url"]) as client:
        error = assert_openai_error(client.post(path, json=body), 400)
    assert error["param"] == param
    assert not env["a"].received


def test_n_up_to_the_cap_passes(env):
    with raw(env["url"]) as client:
        response = client.post(gateway.COMPLETIONS, json={
            "model": "gemma-3-12b", "prompt": "x", "max_tokens": 1, "n": gateway.MAX_N})
    assert response.status_code == 200 and env["a"].last_body["n"] == gateway.MAX_N


def test_upstream_4xx_keeps_vllm_message(env):
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(env["url"]).chat.completions.create(model="gemma-3-12b", messages=HELLO, max_tokens=0)
    assert "max_tokens" in caught.value.message


def test_body_over_limit_is_413(matrix, env):
    with start_gateway(matrix, {"gemma-3-12b": "http://127.0.0.1:9"}, max_body_bytes=4096) as gw:
        with pytest.raises(openai.APIStatusError) as caught:
            sdk(gw.url).chat.completions.create(
                model="gemma-3-12b", messages=[{"role": "user", "content": "x" * 5000}])
        assert caught.value.status_code == 413
        # Declared too large: refused before the body is sent at all.
        with socket.create_connection((HOST, gw.port), timeout=5) as s:
            s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}"
                      "\r\nContent-Length: 10000000000\r\n\r\n".encode())
            assert s.recv(4096).startswith(b"HTTP/1.1 413")
        # Not declared (chunked): refused once it grows past the limit.
        with raw(gw.url) as client:
            response = client.post(gateway.COMPLETIONS, content=(b"x" * 1024 for _ in range(8)))
        assert_openai_error(response, 413)


def test_large_image_request_fits_the_default_limit(env):
    image = "data:image/png;base64," + "A" * (3 * 1024 * 1024)
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                             {"type": "image_url", "image_url": {"url": image}}]}]
    sdk(env["url"]).chat.completions.create(model="gemma-3-12b", messages=messages)
    assert env["a"].last_body["messages"] == messages


# ## Streaming: keep-alives, broken backends


def test_cold_backend_gets_keepalives_until_its_first_byte(matrix):
    with ThreadServer(StandIn([G12], delay=0.45)) as slow, \
            start_gateway(matrix, {"gemma-3-12b": slow.url}, keepalive_interval=0.1) as gw:
        with raw(gw.url).stream("POST", gateway.CHAT, json={
                "model": "gemma-3-12b", "messages": HELLO, "stream": True}) as response:
            assert response.status_code == 200
            body = response.read().decode()
        head, _, rest = body.partition("data: ")
        assert head.count(": keep-alive\n\n") >= 3 and rest.rstrip().endswith("[DONE]")
        chunks = list(sdk(gw.url).chat.completions.create(
            model="gemma-3-12b", messages=HELLO, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks).endswith("Hello!")


def test_backend_dying_mid_stream_raises_in_the_sdk(matrix):
    with ThreadServer(StandIn([G12], break_after=3)) as breaking, \
            start_gateway(matrix, {"gemma-3-12b": breaking.url}) as gw:
        stream = sdk(gw.url).chat.completions.create(model="gemma-3-12b", messages=HELLO,
                                                     stream=True)
        seen = 0
        with pytest.raises(openai.APIError, match="broke off the stream"):
            for _ in stream:
                seen += 1
        assert seen == 3
        with raw(gw.url).stream("POST", gateway.COMPLETIONS, json={
                "model": "gemma-3-12b", "prompt": "x", "stream": True}) as response:
            last = response.read().decode().rstrip().rsplit("\n\n", 1)[-1]
        assert json.loads(last.removeprefix("data: "))["error"]["code"] == 502


def test_stream_error_before_first_byte_keeps_its_status(env):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        list(sdk(env["url"]).chat.completions.create(model="gemma-3-12b", messages=HELLO,
                                                     stream=True, max_tokens=0))


# ## Backend failures


@pytest.mark.parametrize("stream", [False, True])
def test_a_backend_not_listening_yet_is_503_with_retry_after(matrix, stream):
    """vLLM 0.33 does not listen until its model is loaded: the gateway sees connection
    refused, and tells the client to come back; once it listens, the same request works."""
    standin = StandIn([G12], ready_after=0.5)
    with standin_server(standin, wait=False) as starting, \
            start_gateway(matrix, {"gemma-3-12b": starting.url}) as gw:
        with pytest.raises(openai.InternalServerError) as caught:
            reply = sdk(gw.url).chat.completions.create(model="gemma-3-12b", messages=HELLO,
                                                        stream=stream)
            list(reply) if stream else None
        assert caught.value.status_code == 503 and "connection refused" in caught.value.message
        assert int(caught.value.response.headers["retry-after"]) > 0
        assert wait_until(lambda: starting.listening, timeout=30)
        assert sdk(gw.url).chat.completions.create(model="gemma-3-12b", messages=HELLO)


@pytest.mark.parametrize("stream", [False, True])
def test_an_upstream_503_keeps_its_retry_after(matrix, stream):
    """A proxy in front of vLLM (or Modal) may answer 503 while a model starts."""
    with ThreadServer(StandIn([G12], fail_status=503)) as starting, \
            start_gateway(matrix, {"gemma-3-12b": starting.url}) as gw:
        with pytest.raises(openai.InternalServerError) as caught:
            reply = sdk(gw.url).chat.completions.create(model="gemma-3-12b", messages=HELLO,
                                                        stream=stream)
            list(reply) if stream else None
        assert caught.value.status_code == 503
        assert int(caught.value.response.headers["retry-after"]) > 0


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_5xx_is_502(matrix, stream):
    with ThreadServer(StandIn([G27], fail_status=500)) as failing, \
            start_gateway(matrix, {"gemma-3-27b": failing.url}) as gw:
        for name in ("gemma-3-27b",):
            with pytest.raises(openai.InternalServerError) as caught:
                reply = sdk(gw.url).chat.completions.create(model=name, messages=HELLO,
                                                            stream=stream)
                list(reply) if stream else None
            assert caught.value.status_code == 502
            assert caught.value.body["type"] == "BadGatewayError"


def test_slow_backend_times_out_as_504(matrix):
    with ThreadServer(StandIn([G12], delay=3)) as slow, \
            start_gateway(matrix, {"gemma-3-12b": slow.url}, backend={"timeout": 0.2}) as gw:
        with pytest.raises(openai.InternalServerError) as caught:
            sdk(gw.url).chat.completions.create(model="gemma-3-12b", messages=HELLO)
        assert caught.value.status_code == 504


def test_backend_key_is_sent_and_its_bare_401_is_not_the_clients_fault(matrix):
    with ThreadServer(StandIn([G12], api_key="backend-key")) as guarded:
        with start_gateway(matrix, {"gemma-3-12b": guarded.url}) as gw:
            with pytest.raises(openai.InternalServerError) as caught:
                sdk(gw.url).chat.completions.create(model="gemma-3-12b", messages=HELLO)
            assert caught.value.status_code == 502 and "credentials" in caught.value.message
        with start_gateway(matrix, {"gemma-3-12b": guarded.url},
                           backend={"api_key": "backend-key"}) as gw:
            assert sdk(gw.url).chat.completions.create(model="gemma-3-12b", messages=HELLO)


# ## Client disconnects cancel the backend request


def test_client_disconnect_cancels_the_backend_request(matrix):
    with ThreadServer(StandIn([G12], delay=5)) as slow, \
            start_gateway(matrix, {"gemma-3-12b": slow.url}) as gw:
        with pytest.raises(httpx.ReadTimeout):
            raw(gw.url).post(gateway.CHAT, timeout=0.3,
                             json={"model": "gemma-3-12b", "messages": HELLO})
        assert wait_until(lambda: slow.app.disconnects == [gateway.CHAT])


def test_client_disconnect_mid_stream_cancels_the_backend_stream(matrix):
    with ThreadServer(StandIn([G12], token_delay=0.05)) as slow, \
            start_gateway(matrix, {"gemma-3-12b": slow.url}) as gw:
        prompt = " ".join(["word"] * 200)
        with raw(gw.url).stream("POST", gateway.COMPLETIONS, json={
                "model": "gemma-3-12b", "prompt": prompt, "max_tokens": 200,
                "stream": True}) as response:
            first = next(response.iter_bytes())
        assert first.startswith(b"data: ")
        assert wait_until(lambda: slow.app.disconnects == [gateway.COMPLETIONS])


# ## Logs


def test_one_structured_log_line_per_request_and_never_the_key(env, caplog):
    caplog.set_level(logging.INFO, logger="gateway")
    client = sdk(env["url"])
    client.chat.completions.create(model="gemma-3-12b", messages=HELLO)
    for key in ("wrong-" + KEY, KEY[:8]):
        with pytest.raises(openai.AuthenticationError):
            sdk(env["url"], key=key).models.list()
    assert wait_until(lambda: len(caplog.records) >= 3)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway"]
    ok = lines[0]
    assert ok["model"] == "gemma-3-12b" and ok["status"] == 200 and ok["ms"] >= 0
    assert re.fullmatch("[0-9a-f]{16}", ok["request_id"]) and ok["path"] == gateway.CHAT
    assert [line["status"] for line in lines[1:]] == [401, 401]
    assert KEY not in caplog.text and KEY[:8] not in caplog.text
    assert "authorization" not in caplog.text.lower()


def asgi_call(app, method: str, path: str, headers: list, body: bytes = b"") -> list[dict]:
    """One request straight into the ASGI app: what any server may hand it, unparsed."""
    sent, received = [], []

    async def receive():
        if received:  # the body was read: the client waits for the answer, then stays
            await asyncio.Event().wait()
        received.append(True)
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": headers}
    asyncio.run(app(scope, receive, send))
    return sent


def test_an_absurd_content_length_is_413_not_a_crash(matrix):
    app = gateway.build_app([matrix.models["gemma-3-12b"]], gateway.HTTPBackend({}), api_key=KEY)
    auth = (b"authorization", f"Bearer {KEY}".encode())
    length = b"9" * 5000  # past int()'s 4300-digit limit
    sent = asgi_call(app, "POST", gateway.COMPLETIONS, [auth, (b"content-length", length)])
    assert sent[0]["status"] == 413


def test_a_chunked_body_that_arrives_whole_is_still_limited(matrix):
    """A chunked body (no Content-Length) may be buffered whole by the server before the app
    reads it, and then comes as one message: the limit holds for it too (it did not, and a
    loaded machine showed it as a 400 where a 413 belonged)."""
    app = gateway.build_app([matrix.models["gemma-3-12b"]], gateway.HTTPBackend({}), api_key=KEY,
                            max_body_bytes=4096)
    auth = (b"authorization", f"Bearer {KEY}".encode())
    sent = asgi_call(app, "POST", gateway.COMPLETIONS, [auth], b"x" * 4097)
    assert sent[0]["status"] == 413
    sent = asgi_call(app, "POST", gateway.COMPLETIONS, [auth], b" " * 4096)
    assert sent[0]["status"] == 400  # at the limit it is read (and is not JSON)


def test_a_failure_inside_the_gateway_is_an_openai_shaped_500_and_logged(matrix, caplog):
    """What the gateway does not foresee (here a refresh of what is served that raises, as a
    bare upstream's malformed listing could) still answers in OpenAI's shape, with the
    status in its log line; it was uvicorn's plain-text 500, logged as status 0."""
    caplog.set_level(logging.INFO, logger="gateway")

    async def refresh(force=False):
        raise RecursionError("maximum recursion depth exceeded")

    app = gateway.build_app([matrix.models["gemma-3-12b"]], gateway.HTTPBackend({}), api_key=KEY,
                            refresh=refresh)
    sent = []

    async def receive():
        return {"type": "http.request", "body": b'{"model": "nope"}', "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": gateway.CHAT,
             "headers": [(b"authorization", f"Bearer {KEY}".encode())]}
    with pytest.raises(RecursionError):  # re-raised once answered: the server logs its trace
        asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 500
    error = json.loads(sent[1]["body"])["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == 500
    (line,) = log_lines(caplog)
    assert line["status"] == 500 and line["error"] == "gateway failed: RecursionError"


class HeaderBackend:
    """A backend that reports something about the call in a response header."""

    def __init__(self):
        self.bodies = []

    async def send(self, model, path, body, headers):
        self.bodies.append(body)
        headers.append((b"x-backend", b"send"))
        return 200, b'{"id": "x", "choices": []}'

    async def stream(self, model, path, body, headers):
        self.bodies.append(body)
        headers.append((b"x-backend", b"stream"))
        yield b"data: [DONE]\n\n"


@pytest.mark.parametrize("stream", [False, True])
def test_a_backend_adds_response_headers_and_receives_bytes(matrix, stream):
    backend = HeaderBackend()
    app = gateway.build_app([matrix.models["gemma-3-12b"]], backend, api_key=KEY)
    body = json.dumps({"model": "gemma-3-12b", "prompt": "hi", "stream": stream}).encode()
    sent = asgi_call(app, "POST", gateway.COMPLETIONS,
                     [(b"authorization", f"Bearer {KEY}".encode())], body)
    assert sent[0]["status"] == 200
    assert (b"x-backend", b"stream" if stream else b"send") in sent[0]["headers"]
    assert json.loads(backend.bodies[0])["model"] == "google/gemma-3-12b-it"
    if not stream:
        assert sent[1]["body"] == b'{"id": "x", "choices": []}'  # forwarded as it came


# ## Fields read as vLLM 0.33 reads them (pydantic's lax mode)


@pytest.mark.parametrize("n", ["129", 129.0, 1e3, " 200 ", "1_000", True and 129])
@pytest.mark.parametrize("path", [gateway.CHAT, gateway.COMPLETIONS])
def test_the_n_cap_holds_for_every_form_vllm_coerces(env, n, path):
    body = {"model": "gemma-3-12b", "messages": HELLO, "prompt": "x", "n": n}
    with raw(env["url"]) as client:
        error = assert_openai_error(client.post(path, json=body), 400)
    assert error["param"] == "n" and not env["a"].received


@pytest.mark.parametrize(("prompt", "n", "ok"), [
    (["p"] * 1000, 1, False), (["p"] * 128, 1, True), (["p"] * 65, 2, False),
    ([[1, 2]] * 64, 2, True), ([[1, 2]] * 129, 1, False), (list(range(1000)), 128, True),
    ("one prompt", 128, True), ([1.0, 2.0], 128, True),
])
def test_completions_cap_n_times_the_prompts(env, prompt, n, ok):
    body = {"model": "gemma-3-12b", "prompt": prompt, "n": n, "max_tokens": 1}
    with raw(env["url"]) as client:
        response = client.post(gateway.COMPLETIONS, json=body)
    if ok:
        assert response.status_code == 200, response.text
    else:
        assert_openai_error(response, 400)
        assert not env["a"].received


@pytest.mark.parametrize(("prompt", "n", "prompts"), [
    (b"[" + b" " * 100 + b"1, 2, 3]", 128, 1),  # one tokenized prompt, however it is spaced
    (b"[" + b"\n" * 100 + b'"a", "b"]', 64, 2),
    (b"[" + b" " * 100 + b'"p"' + b', "p"' * 128 + b"]", 1, gateway.MAX_N + 1),
])
def test_prompts_are_counted_past_any_whitespace(prompt, n, prompts):
    """The count looked at the first 64 bytes only: token ids after more blank space were
    taken for more than 128 prompts, a 400 for a request vLLM takes."""
    fields = gateway.parse_body(b'{"model": "gemma-3-12b", "n": %d, "prompt": %s}' % (n, prompt))
    assert gateway.count_prompts(fields["prompt"]) == prompts
    if prompts * n <= gateway.MAX_N:
        gateway.limit_sequences(fields, completions=True)
    else:
        with pytest.raises(gateway.Reject):
            gateway.limit_sequences(fields, completions=True)


@pytest.mark.parametrize("stream", ["true", 1, "yes", "on", 1.0, "1"])
def test_a_truthy_non_boolean_stream_is_streamed(env, stream):
    with raw(env["url"]) as client:
        response = client.post(gateway.CHAT, json={"model": "gemma-3-12b", "messages": HELLO,
                                                   "stream": stream})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.text.rstrip().endswith("data: [DONE]")


@pytest.mark.parametrize("stream", ["false", 0, "no", None])
def test_a_falsy_stream_is_one_json_answer(env, stream):
    with raw(env["url"]) as client:
        response = client.post(gateway.CHAT, json={"model": "gemma-3-12b", "messages": HELLO,
                                                   "stream": stream})
    assert response.status_code == 200 and response.json()["object"] == "chat.completion"


@pytest.mark.parametrize("so", ["regex", ["json"], 1, True])
def test_a_non_object_structured_outputs_is_a_400_not_vllms_500(env, so):
    with raw(env["url"]) as client:
        error = assert_openai_error(client.post(gateway.CHAT, json={
            "model": "gemma-3-12b", "messages": HELLO, "structured_outputs": so}), 400)
    assert error["param"] == "structured_outputs" and not env["a"].received
    with ThreadServer(StandIn([G12])) as direct:  # what vLLM 0.33 itself answers
        response = httpx.post(direct.url + gateway.CHAT, json={
            "model": G12, "messages": HELLO, "structured_outputs": so})
    assert response.status_code == 500


def test_a_lone_guided_whitespace_pattern_is_dropped_not_sent_alone(env):
    reply = sdk(env["url"]).chat.completions.create(
        model="gemma-3-12b", messages=HELLO, extra_body={"guided_whitespace_pattern": r"\s*"})
    assert reply.choices[0].message.content
    assert "structured_outputs" not in env["a"].last_body
    assert not [k for k in env["a"].last_body if k.startswith("guided_")]
    sdk(env["url"]).chat.completions.create(model="gemma-3-12b", messages=HELLO, extra_body={
        "guided_json": PERSON, "guided_whitespace_pattern": " "})
    assert env["a"].last_body["structured_outputs"] == {"json": PERSON, "whitespace_pattern": " "}


def test_the_legacy_top_level_structural_tag_is_translated(env):
    tag = json.dumps({"type": "structural_tag", "format": {"type": "const_string", "value": "x"}})
    with raw(env["url"]) as client:
        client.post(gateway.CHAT, json={"model": "gemma-3-12b", "messages": HELLO,
                                        "structural_tag": tag})
    assert env["a"].last_body["structured_outputs"] == {"structural_tag": tag}
    assert "structural_tag" not in env["a"].last_body


# ## Bodies: bounded work, and the client's bytes when nothing changes


def nested(depth: int) -> bytes:
    return (b'{"model": "' + G12.encode() + b'", "prompt": "x", "max_tokens": 1, "x": '
            + b"[" * depth + b"]" * depth + b"}")


def test_depth_is_bounded_at_400(env):
    with raw(env["url"]) as client:
        assert client.post(gateway.COMPLETIONS, content=nested(399)).status_code == 200
        for depth in (401, 970, 100_000):
            error = assert_openai_error(client.post(gateway.COMPLETIONS, content=nested(depth)),
                                        400)
            assert "nested more than 400 deep" in error["message"]


def test_brackets_inside_strings_do_not_count(env):
    with raw(env["url"]) as client:
        body = {"model": "gemma-3-12b", "prompt": "[" * 5000 + "{" * 5000, "max_tokens": 1}
        assert client.post(gateway.COMPLETIONS, json=body).status_code == 200


def test_a_body_of_empty_arrays_is_refused_cheaply(env):
    body = b'{"model": "gemma-3-12b", "prompt": "x", "x": [' + b"[]," * 200_000 + b"[]]}"
    with raw(env["url"]) as client:
        error = assert_openai_error(client.post(gateway.COMPLETIONS, content=body), 400)
    assert "more than 100000 arrays" in error["message"] and not env["a"].received


def test_the_clients_bytes_are_forwarded_unchanged_when_nothing_is_rewritten(env):
    body = (b'{ "model" : "google/gemma-3-12b-it",\n "prompt": "caf\\u00e9 \xf0\x9f\x98\x80",'
            b' "max_tokens": 1.0e0, "temperature": 0.50 }')
    with raw(env["url"]) as client:
        assert client.post(gateway.COMPLETIONS, content=body).status_code == 200
    assert env["a"].raw_bodies[-1] == body
    with raw(env["url"]) as client:  # a rewritten model keeps every other value's bytes
        client.post(gateway.COMPLETIONS, content=body.replace(b"google/gemma-3-12b-it",
                                                              b"GEMMA-3-12B"))
    assert env["a"].raw_bodies[-1] == (b'{"model":"google/gemma-3-12b-it","prompt":'
                                       b'"caf\\u00e9 \xf0\x9f\x98\x80","max_tokens":1.0e0,'
                                       b'"temperature":0.50}')


LONG = 300  # bytes: past what the gateway decodes of a value it decides on


@pytest.mark.parametrize(("field", "value", "means"), [
    ("n", b"129." + b"0" * LONG, 129), ("n", b'"' + b" " * LONG + b'129"', 129),
    ("n", b'"' + b"0" * LONG + b'129"', 129), ("stream", b"1." + b"0" * LONG, True),
])
@pytest.mark.parametrize("path", [gateway.CHAT, gateway.COMPLETIONS])
def test_a_long_spelling_of_n_or_stream_is_refused_not_passed_on(env, field, value, means, path):
    """vLLM reads `129.000...0` or `"   ...129"` at any length (json.loads, then pydantic's lax
    mode): passed on unread, they went around the n cap, or streamed an answer the gateway
    waited for as one JSON object (a 502 once generation ended)."""
    body = b'{"model": "gemma-3-12b", "messages": [], "prompt": "x", "%s": %s}' % (
        field.encode(), value)
    lax = gateway._LAX_INT if field == "n" else gateway._LAX_BOOL
    assert lax.validate_python(json.loads(body)[field]) == means  # what vLLM would use
    with raw(env["url"]) as client:
        error = assert_openai_error(client.post(path, content=body), 400)
    assert error["param"] == field and not env["a"].received


def test_duplicate_keys_are_read_as_vllm_reads_them_the_last_one_wins(env):
    body = b'{"model": "gemma-3-12b", "prompt": "x", "n": 1, "n": 500}'
    with raw(env["url"]) as client:
        assert assert_openai_error(client.post(gateway.COMPLETIONS, content=body),
                                   400)["param"] == "n"


# ## Key hygiene, logs, HEAD


def test_a_key_with_whitespace_is_stripped_with_a_warning(matrix, caplog):
    caplog.set_level(logging.WARNING, logger="gateway")
    app = gateway.build_app([matrix.models["gemma-3-12b"]], gateway.HTTPBackend({}),
                            api_key=f"  {KEY}\n")
    with ThreadServer(app) as gw:
        assert raw(gw.url).get("/v1/models").status_code == 200
    assert "stripped" in caplog.text and KEY not in caplog.text
    with pytest.raises(config.UsageError):
        gateway.build_app([matrix.models["gemma-3-12b"]], gateway.HTTPBackend({}), api_key=" \n")


def log_lines(caplog) -> list[dict]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway"]


def test_a_path_holding_the_key_is_masked_in_the_log(env, caplog):
    caplog.set_level(logging.INFO, logger="gateway")
    with raw(env["url"]) as client:
        client.get(f"/v1/{KEY}/models")
        client.get("/x" * 45 + KEY)  # the key past the clipping point, not cut in two
    assert wait_until(lambda: len(log_lines(caplog)) >= 2)
    assert KEY not in caplog.text and KEY[:12] not in caplog.text
    assert [line["status"] for line in log_lines(caplog)] == [404, 404]


def test_an_unknown_models_name_is_logged_clipped_and_escaped(env, caplog):
    caplog.set_level(logging.INFO, logger="gateway")
    name = "evil\n{\"status\": 200}" + "x" * 500
    with raw(env["url"]) as client:
        client.post(gateway.CHAT, json={"model": name, "messages": HELLO})
    assert wait_until(lambda: log_lines(caplog))
    (line,) = log_lines(caplog)
    assert line["status"] == 404 and line["model"].startswith("evil\n{")
    assert len(line["model"]) <= 101 and "\n" not in caplog.records[0].getMessage()


def test_a_client_that_leaves_is_logged_499_with_its_model(matrix, caplog):
    caplog.set_level(logging.INFO, logger="gateway")
    with ThreadServer(StandIn([G12], delay=5)) as slow, \
            start_gateway(matrix, {"gemma-3-12b": slow.url}) as gw:
        with pytest.raises(httpx.ReadTimeout):
            raw(gw.url).post(gateway.CHAT, timeout=0.3,
                             json={"model": "gemma-3-12b", "messages": HELLO})
        assert wait_until(lambda: log_lines(caplog))
    assert log_lines(caplog)[0]["status"] == 499
    assert log_lines(caplog)[0]["model"] == "gemma-3-12b"


def test_head_answers_wherever_get_does(env):
    with raw(env["url"]) as client:
        head = client.head("/v1/models")
        assert head.status_code == 200 and head.content == b""
        assert int(head.headers["content-length"]) == len(client.get("/v1/models").content)
        assert client.head("/health").status_code == 200
        assert client.post("/v1/models").headers["allow"] == "GET, HEAD"
