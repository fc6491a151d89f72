"""LiteLLM's own code against our files, as `docker compose up` runs it, minus Docker.

The proxy of the version docker-compose.yml pins loads the committed litellm_config.yaml
with the environment compose gives it, and chat requests go through it to our gateway
(`deploy.py --serve-local`, one per GPU) to stand-in vLLM servers that record them.

LiteLLM cannot share this project's lockfile (litellm[proxy] 1.108.7 needs rich<14, the
project pins rich 15), so it has its own locked project, litellm-proxy/, which the first
test here syncs with uv (quick once uv's cache holds the wheels). Starting the proxy
takes 20-30 s of imports on a small machine; every test shares one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from servers import HOST, ROOT_DIR, ProcessServer, ThreadServer, free_port
from standin import StandIn

import config
import exports

# Taken before conftest points HOME at a temporary folder: uv's cache is under the real one.
REAL_ENV = dict(os.environ)
PROJECT = ROOT_DIR / "litellm-proxy"
KEY = "sk-gateway-key-for-litellm-test"  # VLLM_API_KEY: what our gateways check
MASTER = "sk-litellm-master-for-the-test"  # LITELLM_MASTER_KEY: what the proxy's clients send
STARTUP_TIMEOUT = 240.0  # seconds; ~30 s here, shared CI machines are slower


def sync_litellm_environment() -> Path:
    """`uv sync --locked` of litellm-proxy/ into its own .venv; the path of its `litellm`."""
    uv = REAL_ENV.get("UV") or shutil.which("uv", path=REAL_ENV.get("PATH"))
    if not uv:
        pytest.fail("uv is needed to build the LiteLLM environment (see README)")
    env = {k: v for k, v in REAL_ENV.items() if k not in ("VIRTUAL_ENV", "UV_PROJECT_ENVIRONMENT")}
    env["UV_PROJECT_ENVIRONMENT"] = str(PROJECT / ".venv")
    done = subprocess.run([uv, "sync", "--locked", "--no-progress", "--project", str(PROJECT)],
                          env=env, capture_output=True, text=True, timeout=1500, check=False)
    assert done.returncode == 0, f"uv sync of {PROJECT.name}/ failed:\n{done.stderr[-3000:]}"
    executable = PROJECT / ".venv" / "bin" / "litellm"
    assert executable.exists(), done.stderr[-3000:]
    return executable


def compose_environment() -> dict:
    service = yaml.safe_load((ROOT_DIR / "docker-compose.yml").read_text())["services"]["litellm"]
    return service["environment"]


class Stack:
    """Stand-ins behind gateways behind one LiteLLM proxy; the URLs and what each received."""

    def __init__(self, proxy_url: str, standins: dict[str, StandIn], gateways: dict[str, str],
                 trap: StandIn, down: str, log: Path):
        self.proxy_url, self.standins, self.gateways, self.trap, self.down, self.log = (
            proxy_url, standins, gateways, trap, down, log)

    def client(self, key: str = MASTER) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.proxy_url}/v1", api_key=key, max_retries=0,
                             timeout=120)

    def counts(self) -> dict[str, int]:
        return {gpu: len(s.received) for gpu, s in self.standins.items()} | {
            "trap": len(self.trap.received)}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    litellm = sync_litellm_environment()
    matrix = config.load()
    names = [m.name for m in matrix.models.values()]
    work = tmp_path_factory.mktemp("litellm")
    log = work / "litellm.log"
    down = f"http://{HOST}:{free_port()}/v1"  # nothing listens here: the A100 app is down
    standins = {gpu: StandIn(names) for gpu in ("l40s", "h100")}
    trap = StandIn(names)  # where LiteLLM sends a deployment that has no api_base
    with ThreadServer(standins["l40s"]) as s_l40s, ThreadServer(standins["h100"]) as s_h100, \
            ThreadServer(trap) as trap_server:
        gateways = {}
        servers = []
        try:
            for gpu, backend in (("l40s", s_l40s), ("h100", s_h100)):
                port = free_port()
                server = ProcessServer(
                    [sys.executable, "deploy.py", "--serve-local", "--port", str(port),
                     "--upstream", f"{backend.url}/v1"], port, cwd=ROOT_DIR,
                    env={**REAL_ENV, "VLLM_API_KEY": KEY, "HOME": str(work)},
                    log=(work / f"gateway-{gpu}.log").open("w"))
                servers.append(server.__enter__())
                gateways[gpu] = f"http://{HOST}:{port}/v1"
            port = free_port()
            env = {
                "PATH": REAL_ENV.get("PATH", ""), "HOME": str(work),
                "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # offline: no cost map download
                "LITELLM_LOG": "ERROR",
                "VLLM_API_KEY": KEY, "LITELLM_MASTER_KEY": MASTER,
                exports.api_base_env("l40s"): gateways["l40s"],
                exports.api_base_env("h100"): gateways["h100"],
                exports.api_base_env("a100"): down,
                # h200 and b200 are left unset. compose points OPENAI_BASE_URL at an .invalid
                # host; the trap stands in for that host, to see what would have gone there.
                "OPENAI_BASE_URL": f"{trap_server.url}/v1",
            }
            assert set(compose_environment()) >= {"OPENAI_BASE_URL", "OPENAI_API_BASE"}
            proxy = ProcessServer(
                [str(litellm), "--config", str(ROOT_DIR / "litellm_config.yaml"),
                 "--host", HOST, "--port", str(port)], port, env=env, cwd=work,
                timeout=STARTUP_TIMEOUT, log=log.open("w"))
            try:
                servers.append(proxy.__enter__())
            except (RuntimeError, TimeoutError) as exc:
                pytest.fail(f"LiteLLM did not start: {exc}\n{log.read_text()[-4000:]}")
            yield Stack(proxy.url, standins, gateways, trap, down, log)
        finally:
            for server in reversed(servers):
                server.__exit__(None, None, None)


def chat(stack: Stack, model: str, **extra):
    return stack.client().chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hello there"}], max_tokens=8,
        **extra)


def new_requests(stack: Stack, before: dict[str, int]) -> dict[str, list[dict]]:
    after = stack.counts()
    places = {**stack.standins, "trap": stack.trap}
    return {place: places[place].received[before[place]:] for place in after
            if after[place] > before[place]}


# ## LiteLLM's own loader reads the committed config


def test_litellm_loads_every_model_name_with_its_endpoint_and_order(stack):
    reply = httpx.get(f"{stack.proxy_url}/model/info", timeout=60,
                      headers={"Authorization": f"Bearer {MASTER}"})
    assert reply.status_code == 200, reply.text
    assert KEY not in reply.text  # LiteLLM does not show the gateway key back
    deployments = reply.json()["data"]
    matrix = config.load()
    expected = exports.litellm_config(matrix)["model_list"]
    assert [d["model_name"] for d in deployments] == [e["model_name"] for e in expected]
    loaded = {(d["model_name"], d["litellm_params"].get("api_base"),
               d["litellm_params"]["model"], d["litellm_params"].get("order"))
              for d in deployments}
    assert ("gemma-3-12b-h100", stack.gateways["h100"], "openai/google/gemma-3-12b-it",
            None) in loaded
    assert ("qwen3-vl-30b-l40s", stack.gateways["l40s"],
            "openai/Qwen/Qwen3-VL-30B-A3B-Instruct", None) in loaded
    group = sorted((d["litellm_params"]["order"], d["litellm_params"].get("api_base"))
                   for d in deployments if d["model_name"] == "gemma-3-27b")
    # a100 ($2.80/h), h100 ($4.25/h), 2 x l40s ($4.30/h: GPUs + CPU + memory), then h200,
    # b200 (unset)
    assert group == [(1, stack.down), (2, stack.gateways["h100"]), (3, stack.gateways["l40s"]),
                     (4, None), (5, None)]


# ## Chat requests through LiteLLM, our gateway and a stand-in vLLM


def test_model_gpu_name_reaches_that_gpu_with_the_canonical_name_and_key(stack):
    before = stack.counts()
    reply = chat(stack, "gemma-3-12b-h100")
    assert reply.choices[0].message.content.startswith("This is the stand-in answering")
    got = new_requests(stack, before)
    assert list(got) == ["h100"]  # the gateway took the key (else 401) and routed the name
    (request,) = got["h100"]
    assert request["path"] == "/v1/chat/completions"
    assert request["body"]["model"] == "google/gemma-3-12b-it"
    assert request["body"]["messages"] == [{"role": "user", "content": "Hello there"}]


def test_model_name_alone_goes_to_the_cheapest_gpu(stack):
    before = stack.counts()
    chat(stack, "gemma-3-12b")  # l40s at $2.25/h is cheapest
    got = new_requests(stack, before)
    assert list(got) == ["l40s"]
    assert got["l40s"][0]["body"]["model"] == "google/gemma-3-12b-it"


def test_falls_back_to_the_next_cheapest_gpu_when_one_is_down(stack):
    before = stack.counts()
    reply = chat(stack, "gemma-3-27b")  # a100 ($2.80/h) is down; next: one H100 at $4.25/h
    assert reply.choices[0].finish_reason in ("stop", "length")
    got = new_requests(stack, before)
    assert list(got) == ["h100"]
    assert got["h100"][-1]["body"]["model"] == "google/gemma-3-27b-it"


def test_streaming_and_structured_outputs_pass_through(stack):
    before = stack.counts()
    stream = chat(stack, "qwen3-vl-30b-h100", stream=True,
                  extra_body={"structured_outputs": {"choice": ["Positive", "Negative"]}})
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == "Positive"
    (request,) = new_requests(stack, before)["h100"]
    assert request["body"]["model"] == "Qwen/Qwen3-VL-30B-A3B-Instruct"
    assert request["body"]["structured_outputs"] == {"choice": ["Positive", "Negative"]}
    assert request["body"]["stream"] is True


def test_the_proxy_refuses_clients_without_its_master_key(stack):
    before = stack.counts()
    with pytest.raises(openai.APIStatusError) as caught:
        stack.client(key=KEY).chat.completions.create(
            model="gemma-3-12b-h100", messages=[{"role": "user", "content": "Hi"}])
    assert caught.value.status_code in (400, 401, 403)
    assert stack.counts() == before


def test_a_gpu_without_api_base_goes_where_openai_base_url_points(stack):
    """Why docker-compose.yml sets OPENAI_BASE_URL to an .invalid host: LiteLLM sends a
    deployment whose os.environ/ api_base is unset there (default: api.openai.com), with
    the gateway key. The trap stands in for that address."""
    before = stack.counts()
    chat(stack, "gemma-3-12b-b200")  # VLLM_B200_API_BASE is not set
    got = new_requests(stack, before)
    assert list(got) == ["trap"]
    assert got["trap"][0]["headers"]["authorization"] == f"Bearer {KEY}"
    assert compose_environment()["OPENAI_BASE_URL"].startswith("http://api-base-not-set.invalid")
