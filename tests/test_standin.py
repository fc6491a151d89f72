"""The stand-in answers as vLLM 0.33 does where the two were seen to differ (each case cites
the vLLM source under /work/vendor/vllm-0.33.0/vllm/ it follows)."""

import httpx
import pytest
from servers import ThreadServer
from standin import StandIn

G12 = "google/gemma-3-12b-it"
HELLO = [{"role": "user", "content": "Hello there, how are you today?"}]
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def url():
    with ThreadServer(StandIn([G12, "gemma-3-12b"])) as server:
        yield server.url


def test_stream_options_without_stream_is_a_400(url):
    # chat_completion/protocol.py validate_stream_options reads the raw value: "false" is truthy
    body = {"model": G12, "messages": HELLO, "stream_options": {"include_usage": True}}
    response = httpx.post(url + CHAT, json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "stream_options"
    assert httpx.post(url + CHAT, json={**body, "stream": "false"}).status_code == 200


def test_max_completion_tokens_wins_over_max_tokens_in_a_chat(url):
    # chat_completion/serving.py: max_completion_tokens if not None, else max_tokens
    body = {"model": G12, "messages": HELLO, "max_tokens": 50, "max_completion_tokens": 2}
    choice = httpx.post(url + CHAT, json=body).json()["choices"][0]
    assert len(choice["message"]["content"].split()) == 2 and choice["finish_reason"] == "length"


def test_a_request_without_model_is_served_by_the_first_name(url):
    # serve/engine/serving.py _is_model_supported: no model is the default model
    assert httpx.post(url + CHAT, json={"messages": HELLO}).json()["model"] == G12


def test_a_field_of_the_wrong_type_is_fastapis_validation_error(url):
    # serve/exception_handling/handlers/validation.py: 400, "Bad Request", param "body.<field>"
    error = httpx.post(url + CHAT, json={"model": G12, "messages": HELLO, "n": "two"}).json()
    assert (error["error"]["type"], error["error"]["param"], error["error"]["code"]) == (
        "Bad Request", "body.n", 400)


def test_the_model_is_checked_after_the_body_parses(url):
    # FastAPI validates the body before the handler's _check_model
    bad = {"model": "nope", "messages": HELLO, "n": "two"}
    assert httpx.post(url + CHAT, json=bad).status_code == 400
    error = httpx.post(url + CHAT, json={**bad, "n": 1}).json()["error"]
    assert error["type"] == "NotFoundError" and "Valid aliases" in error["message"]


def test_model_cards_carry_a_permission_list(url):
    # openai/models/serving.py: ModelCard(..., permission=[ModelPermission()])
    for card in httpx.get(url + "/v1/models").json()["data"]:
        assert card["permission"][0]["object"] == "model_permission"
