"""`deploy.py --serve-local`: upstream parsing, and the real CLI serving over loopback."""

from __future__ import annotations

import os
import subprocess
import sys

import openai
import pytest
from servers import ROOT_DIR, ProcessServer, ThreadServer, free_port
from standin import StandIn

import config
import gateway

KEY = "sk-local-test-key-0123456789"


def test_bare_url_serves_every_model(matrix):
    assert gateway.parse_upstreams(matrix, ["http://gpu-box:8000"]) == {
        key: "http://gpu-box:8000" for key in matrix.models}


def test_named_upstreams_and_a_default(matrix):
    urls = gateway.parse_upstreams(matrix, ["GEMMA-3-27B=http://a:1/v1",
                                            "Qwen/Qwen3-VL-30B-A3B-Instruct=https://b",
                                            "http://default:2?x=y"])
    assert urls == {"gemma-3-12b": "http://default:2?x=y", "gemma-3-27b": "http://a:1/v1",
                    "qwen3-vl-30b": "https://b"}
    assert gateway.parse_upstreams(matrix, ["gemma-3-12b=http://a"]) == {
        "gemma-3-12b": "http://a"}


@pytest.mark.parametrize("upstreams", [[], ["ftp://x"], ["gemma-3-12b=localhost:8000"],
                                       ["llama=http://x"], ["http://a", "http://b"],
                                       ["gemma-3-12b=http://a", "google/gemma-3-12b-it=http://b"]])
def test_bad_upstreams_are_usage_errors(matrix, upstreams):
    with pytest.raises(config.UsageError):
        gateway.parse_upstreams(matrix, upstreams)


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "deploy.py", *args], check=False, cwd=ROOT_DIR,
                          env=env,
                          capture_output=True, text=True, timeout=60)


def test_serve_local_refuses_to_run_without_a_key():
    result = run_cli("--serve-local", "--upstream", "http://127.0.0.1:9")
    assert result.returncode == 2 and "VLLM_API_KEY" in result.stderr
    result = run_cli("--list", "--upstream", "http://127.0.0.1:9")
    assert result.returncode == 2


def test_serve_local_serves_the_sdk_and_never_shows_the_key(tmp_path):
    port = free_port()
    log = (tmp_path / "gateway.log").open("w+")
    env = {**os.environ, "VLLM_API_KEY": KEY}
    with ThreadServer(StandIn(["google/gemma-3-27b-it"])) as backend, \
            ProcessServer([sys.executable, "deploy.py", "--serve-local", "--port", str(port),
                           "--upstream", f"gemma-3-27b={backend.url}/v1"],
                          port, env=env, log=log, cwd=ROOT_DIR):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
        reply = client.chat.completions.create(model="gemma-3-27b",
                                               messages=[{"role": "user", "content": "Hi"}])
        assert reply.model == "google/gemma-3-27b-it"
        with pytest.raises(openai.NotFoundError, match="no --upstream"):
            client.completions.create(model="gemma-3-12b", prompt="x")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=client.base_url, api_key="nope", max_retries=0).models.list()
    log.seek(0)
    output = log.read()
    assert "google/gemma-3-27b-it (gemma-3-27b) -> " in output and '"status": 200' in output
    assert KEY not in output and KEY[-4:] in output  # masked
