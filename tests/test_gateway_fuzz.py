"""Property-based fuzzing of the gateway over loopback: whatever arrives, no 5xx from bad
input, every error OpenAI-shaped, the key never bypassed, nothing off the allowlist forwarded."""

from __future__ import annotations

import json
import secrets

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError
from servers import ThreadServer
from standin import StandIn

import config
import gateway

KEY = "sk-fuzz-" + secrets.token_hex(12)
ROUTES = ["/health", "/v1/models", gateway.CHAT, gateway.COMPLETIONS]
FORBIDDEN = ["/docs", "/openapi.json", "/invocations", "/tokenize", "/metrics", "/sleep",
             "/wake_up", "/v1/load_lora_adapter", "/v1/embeddings", "/"]
FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MODAL_VLLM_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        matrix = config.load()
    standin = StandIn([m.name for m in matrix.models.values()])
    with ThreadServer(standin) as backend:
        urls = {key: backend.url for key in matrix.models}
        app = gateway.build_app(list(matrix.models.values()), gateway.HTTPBackend(urls),
                                api_key=KEY, max_body_bytes=64 * 1024, keepalive_interval=5)
        with ThreadServer(app) as gw, httpx.Client(base_url=gw.url, timeout=10) as client:
            yield client, standin


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=4),
    max_leaves=12)
def mostly(good, rare=json_values):
    """Usually a well-formed value (so requests get through to the backend), sometimes junk."""
    return st.sampled_from([good, good, good, rare]).flatmap(lambda chosen: chosen)


valid_model = st.sampled_from(["gemma-3-12b", "GOOGLE/GEMMA-3-27B-IT", " Qwen3-VL-30B "])
model_names = mostly(valid_model, st.sampled_from(["gpt-4", "", " "]) | json_values)
constraint = st.sampled_from(["json", "regex", "choice", "grammar", "json_object",
                              "structural_tag", "disable_any_whitespace"])
good_constraint = st.sampled_from([{"json": {"type": "object"}}, {"regex": "[a-z]{3}"},
                                   {"choice": ["x", "y"]}, {"json_object": True},
                                   {"grammar": 'root ::= "a" | "b"'}])
constraint_part = st.one_of(
    st.just({}),
    st.fixed_dictionaries({"structured_outputs": mostly(
        good_constraint, st.dictionaries(constraint, json_values, max_size=2))}),
    st.fixed_dictionaries({"response_format": mostly(st.sampled_from(
        [{"type": "text"}, {"type": "json_object"}]))}),
    st.fixed_dictionaries({"guided_json": mostly(st.just({"type": "object"}))}),
    st.fixed_dictionaries({"guided_regex": st.sampled_from(["a+", "((", r"\d{3}"])}),
    st.fixed_dictionaries({"guided_choice": mostly(st.lists(st.text(min_size=1, max_size=5),
                                                            min_size=1))},
                          optional={"guided_decoding_backend": json_values}),
    st.dictionaries(st.sampled_from(["guided_json", "guided_regex", "guided_choice",
                                     "guided_grammar", "guided_whitespace_pattern",
                                     "guided_decoding_backend", "structured_outputs",
                                     "response_format"]), json_values, max_size=4),
)
request_bodies = st.builds(lambda base, part: {**base, **part}, st.fixed_dictionaries(
    {"model": model_names,
     "messages": mostly(st.just([{"role": "user", "content": "hi"}])),
     "prompt": mostly(st.text(max_size=30))},
    optional={
        "max_tokens": mostly(st.integers(1, 64), st.integers(-2, 0) | json_values),
        "stream": mostly(st.booleans()),
        "stream_options": mostly(st.just({"include_usage": True})),
        "echo": mostly(st.booleans()),
    }), constraint_part)
raw_bodies = st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()) | \
    request_bodies.map(lambda v: json.dumps(v).encode())
paths = st.sampled_from(ROUTES + FORBIDDEN) | st.text(
    st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="?#%"),
    max_size=30).map(lambda t: "/" + t)
methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
wrong_auth = st.sampled_from([None, "Bearer", "Bearer wrong", f"Basic {KEY}", KEY,
                              f"Bearer {KEY}x", f"Bearer {KEY[:-1]}", f"Bearer {KEY.upper()}",
                              f"bearer{KEY}"]) | st.text(
    st.characters(min_codepoint=32, max_codepoint=126), max_size=40).map(lambda t: t.strip())


def check_error_shape(response: httpx.Response) -> None:
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["code"] == response.status_code
        assert set(error) == {"message", "type", "param", "code"}
    assert KEY not in response.text


@FUZZ
@given(method=methods, path=paths, body=raw_bodies)
def test_any_request_with_the_key_never_5xx_and_only_allowlisted_paths_arrive(
        target, method, path, body):
    client, standin = target
    response = client.request(method, path, content=body,
                              headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code < 500, (method, path, body, response.text)
    event(f"status {response.status_code}")
    if not response.headers.get("content-type", "").startswith("text/event-stream"):
        check_error_shape(response)
    assert {r["path"] for r in standin.received} <= {gateway.CHAT, gateway.COMPLETIONS}


@FUZZ
@given(method=methods, path=paths, body=raw_bodies, auth=wrong_auth)
def test_without_the_key_nothing_but_health_answers_and_nothing_is_forwarded(
        target, method, path, body, auth):
    client, standin = target
    before = len(standin.received)
    headers = {"Authorization": auth} if auth else {}
    response = client.request(method, path, content=body, headers=headers)
    if path == "/health" and method == "GET":
        assert response.status_code == 200
    else:
        assert response.status_code in (401, 404), (method, path, auth, response.text)
        check_error_shape(response)
    assert len(standin.received) == before


@FUZZ
@given(path=st.sampled_from([gateway.CHAT, gateway.COMPLETIONS]), body=request_bodies)
def test_completion_requests_of_any_shape_never_5xx(target, path, body):
    """Mostly well-formed requests with wild field values: these reach the stand-in, which
    validates them as vLLM does; the gateway must never turn them into a 5xx."""
    client, standin = target
    response = client.post(path, content=json.dumps(body),
                           headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code < 500, (path, body, response.text)
    event(f"status {response.status_code}")
    if response.status_code == 200 and standin.received:
        forwarded = standin.received[-1]["body"]
        assert not [k for k in forwarded if k.startswith("guided_")]
        assert forwarded["model"] in {m for m in standin.names}
    else:
        check_error_shape(response)


# ## Lax-typed fields: the gateway decides on the value vLLM (pydantic, lax mode) will use

LAX_INT, LAX_BOOL = TypeAdapter(int), TypeAdapter(bool)
numbers = st.integers(-5, 400)
int_forms = st.one_of(
    numbers, numbers.map(float), numbers.map(str), numbers.map(lambda n: f" {n} "),
    numbers.map(lambda n: f"{n}.0"), numbers.map(lambda n: f"{n:_}"),
    numbers.map(lambda n: float(f"{n}e0")), st.floats(-5, 400), st.booleans(),
    st.text(max_size=6), st.none())
bool_forms = st.one_of(
    st.booleans(), st.integers(-1, 2), st.floats(-1, 2), st.none(), st.sampled_from(
        ["true", "True", "TRUE", "1", "yes", "on", "y", "t", "false", "0", "off", "no", "n",
         "f", "", " true", "maybe", "2"]), st.text(max_size=4))


def coerced(adapter, value):
    try:
        return adapter.validate_python(value)
    except ValidationError:
        return None


@FUZZ
@given(n=int_forms, path=st.sampled_from([gateway.CHAT, gateway.COMPLETIONS]))
def test_n_is_capped_on_the_value_vllm_will_use(target, n, path):
    client, standin = target
    before = len(standin.received)
    response = client.post(path, headers={"Authorization": f"Bearer {KEY}"}, content=json.dumps(
        {"model": "gemma-3-12b", "messages": [{"role": "user", "content": "hi"}],
         "prompt": "hi", "max_tokens": 1, "n": n}))
    value = coerced(LAX_INT, n)
    if value is not None and value > gateway.MAX_N:
        assert response.status_code == 400 and response.json()["error"]["param"] == "n"
        assert len(standin.received) == before  # refused before vLLM
    else:
        assert response.status_code in (200, 400), response.text  # vLLM's own answer
        assert len(standin.received) == before + 1
        event(f"n {'valid' if value is not None and value >= 1 else 'refused by vLLM'}")


@FUZZ
@given(stream=bool_forms, path=st.sampled_from([gateway.CHAT, gateway.COMPLETIONS]))
def test_stream_is_decided_as_vllm_will_decide_it(target, stream, path):
    client, _ = target
    response = client.post(path, headers={"Authorization": f"Bearer {KEY}"}, content=json.dumps(
        {"model": "gemma-3-12b", "messages": [{"role": "user", "content": "hi"}],
         "prompt": "hi", "max_tokens": 2, "stream": stream}))
    value = coerced(TypeAdapter(bool | None), stream) if stream is not None else None
    sse = response.headers.get("content-type", "").startswith("text/event-stream")
    if value is True:
        assert response.status_code == 200 and sse, response.text
        assert response.text.rstrip().endswith("[DONE]")
    else:
        assert not sse and response.status_code in (200, 400), response.text
        assert response.status_code == (400 if value is None and stream is not None else 200)
    event(f"stream {value}")
