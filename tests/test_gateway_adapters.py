"""LoRA adapters through the gateway: routed to their base model's pool under their own name."""

import httpx
import openai
import pytest
from servers import ThreadServer
from standin import StandIn
from test_adapters import matrix_with

import gateway

KEY = "sk-adapters-test-key"
QWEN = "Qwen/Qwen3-VL-30B-A3B-Instruct"
G12 = "google/gemma-3-12b-it"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MODAL_VLLM_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        matrix = matrix_with(tmp_path_factory.mktemp("m"))
    qwen = StandIn([QWEN, "qwen3-vl-30b", "python", "math"])  # as vLLM with --lora-modules
    gemma = StandIn([G12])
    with ThreadServer(qwen) as sq, ThreadServer(gemma) as sg:
        backend = gateway.HTTPBackend({"qwen3-vl-30b": sq.url, "gemma-3-12b": sg.url})
        served = [matrix.models["gemma-3-12b"], matrix.models["qwen3-vl-30b"]]
        with ThreadServer(gateway.build_app(served, backend, api_key=KEY)) as gw:
            yield {"qwen": qwen, "gemma": gemma, "url": gw.url}


@pytest.fixture
def env(stack):
    stack["qwen"].received.clear()
    stack["gemma"].received.clear()
    return stack


def sdk(url):
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=10)


def test_models_lists_adapters_with_their_parent(env):
    data = httpx.get(env["url"] + "/v1/models",
                     headers={"Authorization": f"Bearer {KEY}"}).json()["data"]
    assert [(m["id"], m["parent"]) for m in data] == [
        (G12, None), (QWEN, None), ("python", QWEN), ("math", QWEN)]
    assert data[2]["aliases"] == ["qwen3-vl-30b:python"]
    assert not env["qwen"].received  # answered by the gateway, not forwarded


@pytest.mark.parametrize(("name", "served_as"), [
    ("python", "python"), ("MATH", "math"), ("qwen3-vl-30b:math", "math"),
    (f"{QWEN.lower()}:Python", "python"), ("qwen3-vl-30b", QWEN),
])
def test_adapter_names_reach_the_base_models_pool(env, name, served_as):
    reply = sdk(env["url"]).chat.completions.create(
        model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert reply.model == served_as
    assert env["qwen"].last_body["model"] == served_as
    assert not env["gemma"].received


@pytest.mark.parametrize("name", ["rust", "qwen3-vl-30b:rust", "gemma-3-12b:python"])
def test_unknown_adapter_is_a_404_like_an_unknown_model(env, name):
    with pytest.raises(openai.NotFoundError) as err:
        sdk(env["url"]).completions.create(model=name, prompt="x", max_tokens=1)
    assert err.value.body["param"] == "model"
    assert "(adapters: python, math)" in err.value.body["message"]
    assert not env["qwen"].received and not env["gemma"].received


@pytest.mark.parametrize("path", ["/v1/load_lora_adapter", "/v1/unload_lora_adapter"])
def test_runtime_adapter_loading_is_never_exposed(env, path):
    response = httpx.post(env["url"] + path, headers={"Authorization": f"Bearer {KEY}"},
                          json={"lora_name": "evil", "lora_path": "/tmp/evil"})
    assert response.status_code == 404
    assert not env["qwen"].received and not env["gemma"].received
