"""The conformance suite and the warm-up (`--test-gpu`, `--test`, `--warm`), run through the
CLI against the real gateway in front of stand-in vLLM servers on loopback: one that
honours every constraint, one that ignores them, one slow to start, one that breaks
streams off, one that rejects the gateway's key. Plus the retrying client and the
client-side verifiers on their own."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
from servers import ROOT_DIR, ProcessServer, ThreadServer, free_port
from standin import StandIn, from_grammar, standin_server
from typer.testing import CliRunner

import checks
import config
import deploy
import gateway
import plan

KEY = "sk-checks-test-key-0123456789"
H100_MODELS = ["gemma-3-12b", "gemma-3-27b", "qwen3-vl-30b"]
STRUCTURED = [name for name in checks.MODEL_CHECKS if name.startswith("structured.")]


def standin(**behaviour) -> StandIn:
    """A stand-in serving every model of the matrix under its served name."""
    return StandIn(["google/gemma-3-12b-it", "google/gemma-3-27b-it",
                    "Qwen/Qwen3-VL-30B-A3B-Instruct"], **behaviour)


@contextmanager
def gateway_before(matrix, upstream: StandIn, models=H100_MODELS):
    """The gateway (as --serve-local builds it) in a thread, in front of a stand-in thread."""
    # A stand-in given ready_after does not listen until then (vLLM's start-up).
    with standin_server(upstream, wait=upstream.ready_at <= time.monotonic()) as up:
        served = [matrix.models[k] for k in models]
        backend = gateway.HTTPBackend({m.key: up.url for m in served})
        app = gateway.build_app(served, backend, api_key=KEY)
        with ThreadServer(app) as gw:
            yield gw.url


def run(*args: str, env: dict | None = None):
    return CliRunner().invoke(deploy.cli, list(args), env={"COLUMNS": "200", **(env or {})})


def suite(url: str, *args: str, key: str = KEY, expect: int = 0) -> dict:
    result = run("--test-gpu", "h100", "--base-url", url, "--api-key", key, "--json", *args)
    assert result.exit_code == expect, result.output
    return json.loads(result.stdout)


def failed(report: dict) -> set[tuple[str, str]]:
    return {(c["check"], c["model"]) for c in report["checks"] if not c["passed"]}


def reasons(report: dict, check: str) -> list[str]:
    return [c["reason"] for c in report["checks"] if c["check"] == check]


# ## Through the real `deploy.py --serve-local`: every check passes


def test_a_conforming_endpoint_passes_every_check(tmp_path):
    port = free_port()
    env = {**os.environ, "VLLM_API_KEY": KEY}
    with ThreadServer(standin()) as up, \
            ProcessServer([sys.executable, "deploy.py", "--serve-local", "--port", str(port),
                           "--upstream", up.url], port, env=env, cwd=ROOT_DIR,
                          log=(tmp_path / "gateway.log").open("w")):
        url = f"http://127.0.0.1:{port}/v1"  # a /v1 suffix is what users copy; it is dropped
        report = suite(url)
        table = run("--test-gpu", "h100", "--base-url", url, env={"VLLM_API_KEY": KEY})
    assert report["passed"] is True and failed(report) == set()
    assert report["endpoint"] == f"http://127.0.0.1:{port}" and report["app"] == "vllm-h100"
    names = [(c["check"], c["model"]) for c in report["checks"]]
    assert names[:4] == [("health", ""), ("auth.no-key", ""), ("auth.wrong-key", ""),
                         ("models", "")]
    assert sorted(names[4:]) == sorted((c, m) for m in H100_MODELS for c in checks.MODEL_CHECKS)
    assert all(c["latency_s"] is not None and c["latency_s"] < 5 for c in report["checks"])
    assert set(report["cold_start_s"]) == {"endpoint", *H100_MODELS}
    assert table.exit_code == 0, table.output
    assert "All 34 checks passed." in table.stdout
    assert "structured.grammar" in table.stdout and "PASS" in table.stdout
    assert KEY not in table.output and "(key sk-…6789)" in table.stdout


# ## Failures the suite must name


def test_ignored_constraints_fail_each_structured_check(matrix):
    with gateway_before(matrix, standin(honour_constraints=False)) as url:
        report = suite(url, expect=1)
        table = run("--test-gpu", "h100", "--base-url", url, "--api-key", KEY)
    assert failed(report) == {(c, m) for c in STRUCTURED for m in H100_MODELS}
    by_check = {c["check"]: c["reason"] for c in report["checks"] if c["model"] == "gemma-3-12b"}
    assert by_check["structured.json_object"].startswith("not JSON; got 'This is the stand-in")
    assert by_check["structured.json_schema"].startswith("not JSON")
    assert by_check["structured.regex"].startswith(r"does not fully match \w+@\w+\.com; got")
    assert by_check["structured.choice"].startswith("not one of Positive, Negative, Neutral")
    assert by_check["structured.grammar"].startswith("not in the grammar's language")
    assert by_check["structured.completion_json"].startswith("not JSON")
    assert table.exit_code == 1
    assert "FAILED 18 of 34 checks: structured.json_object (gemma-3-12b)" in table.stdout


def test_an_endpoint_that_answers_without_a_key_fails_both_auth_checks():
    with ThreadServer(standin()) as open_server:  # vLLM itself, no key: everything answers 200
        report = suite(open_server.url, "--test-model", "gemma-3-12b", expect=1)
    assert failed(report) == {("auth.no-key", ""), ("auth.wrong-key", "")}
    assert reasons(report, "auth.no-key") == [
        ("expected 401: GET /v1/models answered 200; POST /v1/chat/completions answered 200; "
         "POST /v1/completions answered 200")]


def test_a_cold_start_is_waited_for_and_reported_apart_from_latency(matrix):
    upstream = standin(ready_after=2.0)  # connection refused (a 503) until then
    with gateway_before(matrix, upstream) as url:
        report = suite(url, "--deadline", "60s", "--test-model", "gemma-3-27b")
    assert report["passed"] is True
    assert report["cold_start_s"]["endpoint"] < 0.5  # the gateway's /health answers at once
    assert report["cold_start_s"]["gemma-3-27b"] >= 1.0
    chat = next(c for c in report["checks"] if c["check"] == "chat")
    assert chat["waited_s"] >= 1.0 and chat["latency_s"] < 0.5  # the wait is not latency


def test_an_endpoint_still_starting_at_the_deadline_fails_with_the_reason(matrix):
    with gateway_before(matrix, standin(ready_after=60)) as url:
        started = time.monotonic()
        report = suite(url, "--deadline", "1s", "--test-model", "gemma-3-12b", expect=1)
    assert time.monotonic() - started < 15
    assert failed(report) == {(c, "gemma-3-12b") for c in checks.MODEL_CHECKS}
    (chat,) = reasons(report, "chat")
    assert chat.startswith("not ready: no answer within the deadline (1 s)")
    assert "last: HTTP 503: backend for 'google/gemma-3-12b-it' is starting" in chat


def test_a_stream_broken_off_fails_the_stream_check_only(matrix):
    with gateway_before(matrix, standin(break_after=2)) as url:
        report = suite(url, expect=1)
    assert failed(report) == {("chat.stream", m) for m in H100_MODELS}
    assert reasons(report, "chat.stream")[0].startswith(
        "the stream broke off after 2 chunk(s) with an error event: backend for")


def test_a_wrong_key_fails_the_listing_and_skips_the_model_checks(matrix):
    with gateway_before(matrix, standin()) as url:
        result = run("--test-gpu", "h100", "--base-url", url, "--api-key", "sk-not-the-key-42",
                     "--json")
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert failed(report) == {("models", ""), *(("(model checks)", m) for m in H100_MODELS)}
    assert reasons(report, "models") == [
        "the endpoint rejected the API key: HTTP 401: invalid API key"]
    assert "sk-not-the-key-42" not in result.output


def test_a_backend_that_rejects_the_gateways_key_fails_fast(matrix):
    with gateway_before(matrix, standin(api_key="only-for-the-upstream")) as url:
        started = time.monotonic()
        report = suite(url, "--test-model", "gemma-3-12b", "--deadline", "10m", expect=1)
    assert time.monotonic() - started < 10  # a refused key is not a cold start: no waiting
    assert ("chat", "gemma-3-12b") in failed(report)
    assert reasons(report, "chat") == [
        "POST /v1/chat/completions: HTTP 502: the backend refused the gateway's credentials"]
    assert ("health", "") not in failed(report) and ("models", "") not in failed(report)


def test_a_legacy_app_is_expected_to_serve_exactly_its_model(matrix):
    with gateway_before(matrix, standin(), models=["gemma-3-12b"]) as url:
        legacy = run("--test", "gemma-3-12b-h100", "--base-url", url, "--api-key", KEY, "--json")
    assert legacy.exit_code == 0, legacy.output
    assert json.loads(legacy.stdout)["app"] == "vllm-gemma-3-12b-h100"
    assert reasons(json.loads(legacy.stdout), "models") == [""]


def test_your_own_endpoint_is_tested_for_the_models_it_lists(matrix):
    """--serve-local in front of one server (e.g. a bare --upstream) serves one of the h100
    app's three models: the suite tests that one and names the others, instead of failing
    20 checks for models nobody started."""
    with gateway_before(matrix, standin(), models=["gemma-3-12b"]) as url:
        report = suite(url)
        named = suite(url, "--test-model", "qwen3-vl-30b", expect=1)
    assert failed(report) == set()
    assert {c["model"] for c in report["checks"]} == {"", "gemma-3-12b"}
    assert reasons(report, "models") == [(
        "lists 1 of the app's 3 models; not served here (not tested): google/gemma-3-27b-it, "
        "Qwen/Qwen3-VL-30B-A3B-Instruct")]
    assert failed(named) == {("(model checks)", "qwen3-vl-30b")}  # asked for by name: a failure
    assert reasons(named, "(model checks)") == [
        "not run: this endpoint does not list it in /v1/models"]


def test_a_modal_endpoint_must_list_every_model_of_its_app(matrix):
    app = plan.gpu_app(matrix, "h100")
    modal = checks.resolve_target(matrix, app, test_model=None, api_key=KEY, deadline_s=1,
                                  base_url="https://acme--vllm-h100-serve.modal.run")
    local = checks.resolve_target(matrix, app, test_model=None, api_key=KEY, deadline_s=1,
                                  base_url="http://127.0.0.1:8080")
    assert not modal.listed_only and local.listed_only
    listing = {"object": "list", "data": [{"id": "google/gemma-3-12b-it", "parent": None}]}
    with ThreadServer(Scripted((200, listing, []), (200, listing, []))) as server:
        async def check(serving):
            async with checks.Endpoint(server.url, KEY, deadline_s=5) as endpoint:
                return await checks.check_models(checks._Probe(endpoint), modal.expected,
                                                 serving)

        with pytest.raises(checks.CheckFailed, match=r"^missing google/gemma-3-27b-it, Qwen/"):
            asyncio.run(check(None))
        serving = set()
        assert asyncio.run(check(serving)).startswith("lists 1 of the app's 3 models")
        assert serving == {"gemma-3-12b"}


def test_without_base_url_the_endpoint_is_looked_up_on_modal(matrix, monkeypatch):
    calls = []
    with gateway_before(matrix, standin()) as url:
        def endpoint_url(matrix, key, environment=None):
            calls.append((key, environment))
            return url

        monkeypatch.setitem(sys.modules, "cloud", type(sys)("cloud"))
        sys.modules["cloud"].endpoint_url = endpoint_url
        result = run("--test-gpu", "H100", "--test-model", "qwen3-vl-30b", "--json",
                     env={"VLLM_API_KEY": KEY})
        legacy = run("--warm", "gemma-3-12b-l40s", "--json", env={"VLLM_API_KEY": KEY})
    assert result.exit_code == 0, result.output
    assert legacy.exit_code == 0, legacy.output
    assert calls == [("h100", None), ("gemma-3-12b-l40s", None)]


@pytest.mark.parametrize(("args", "message"), [
    (["--test-gpu", "h100", "--keep-warm", "1m"], "--keep-warm goes with --warm, not --test-gpu"),
    (["--warm", "h100", "--concurrency", "4"], "--concurrency goes with --bench or --batch, not --warm"),
    (["--list", "--base-url", "http://x"],
     "--base-url goes with --test-gpu, --test, --warm, --bench or --batch, not --list"),
    (["--test-gpu", "h100", "--warm", "h100"], "choose one of --test-gpu, --warm"),
    (["--test-gpu", "h100", "--base-url", "ftp://x"], "--base-url 'ftp://x': expected an"),
    (["--test-gpu", "h100", "--base-url", "http://127.0.0.1:9"], "needs the endpoint's key"),
    (["--test-gpu", "h100", "--test-model", "llama", "--base-url", "http://x"],
     "unknown model 'llama'"),
    (["--test", "gemma-3-12b-h100", "--test-model", "gemma-3-27b", "--base-url", "http://x"],
     "vllm-gemma-3-12b-h100 does not serve 'gemma-3-27b'; it serves gemma-3-12b"),
    (["--bench", "h100", "--base-url", "http://127.0.0.1:9"], "--bench needs --test-model NAME"),
    (["--bench", "h100", "--test-model", "gemma-3-12b", "--requests", "0", "--base-url",
      "http://127.0.0.1:9"], "--requests must be at least 1"),
    (["--warm", "h100", "--deadline", "soon", "--base-url", "http://x"],
     "cannot read duration 'soon'"),
    (["--test-gpu", "h100", "--dry-run", "--base-url", "http://x"], "--dry-run goes with"),
])
def test_usage_errors_exit_2_before_any_request(args, message):
    result = run(*args, env={"VLLM_API_KEY": ""})
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output


@pytest.mark.parametrize(("args", "message"), [
    (["--bench", "h100"], "--bench needs --test-model NAME: vllm-h100 serves gemma-3-12b"),
    (["--bench", "h100", "--test-model", "gemma-3-12b", "--requests", "0"],
     "--requests must be at least 1"),
])
def test_bench_usage_errors_come_before_the_modal_lookup(monkeypatch, args, message):
    """No --base-url: the URL would be looked up on Modal, but a usage error must come first."""
    import cloud

    def lookup(*a, **k):
        raise AssertionError("looked up on Modal before checking the command line")

    monkeypatch.setattr(cloud, "endpoint_url", lookup)
    result = run(*args, env={"VLLM_API_KEY": KEY})
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_a_missing_key_is_said_before_the_modal_lookup(monkeypatch):
    import cloud

    def lookup(*a, **k):
        raise AssertionError("looked up on Modal before checking the command line")

    monkeypatch.setattr(cloud, "endpoint_url", lookup)
    result = run("--test-gpu", "h100")
    assert result.exit_code == 2, result.output
    assert result.stderr == ("Error: the suite needs the endpoint's key: --api-key KEY or "
                             "VLLM_API_KEY (in the environment or ./.env)\n")


def test_the_key_may_come_from_the_env_file_the_litellm_set_up_writes(matrix, monkeypatch,
                                                                      tmp_path):
    """The spec runs `deploy.py --test-gpu h100` with no key on the command line; its
    LiteLLM set-up keeps VLLM_API_KEY in ./.env (docker compose's file): read from there."""
    env_file = tmp_path / ".env"
    monkeypatch.setenv("MODAL_VLLM_ENV_FILE", str(env_file))
    with gateway_before(matrix, standin()) as url:
        for line in (f"VLLM_API_KEY={KEY}", f'export VLLM_API_KEY="{KEY}"',
                     f"VLLM_API_KEY={KEY}  # the gateway's key"):
            env_file.write_text(f"# the proxy\nMODAL_WORKSPACE=acme\n{line}\n")
            result = run("--test-gpu", "h100", "--base-url", url, "--test-model", "gemma-3-12b",
                         "--json")
            assert result.exit_code == 0, (line, result.output)
        monkeypatch.setenv("VLLM_API_KEY", "sk-the-environment-wins-0123")
        result = run("--test-gpu", "h100", "--base-url", url, "--test-model", "gemma-3-12b",
                     "--json")
    assert result.exit_code == 1 and "the endpoint rejected the API key" in result.stdout


@pytest.mark.parametrize("action", ["--test-gpu", "--warm"])
def test_an_app_that_serves_no_model_is_a_usage_error(tmp_path, action):
    tiny = tmp_path / "models.yaml"
    tiny.write_text(config.DEFAULT_PATH.read_text().replace(
        "l40s: {modal_gpu: L40S, vram_gb: 48", "l40s: {modal_gpu: L40S, vram_gb: 1"))
    result = run(action, "l40s", "--base-url", "http://127.0.0.1:9", "--api-key", KEY,
                 "--config", str(tiny))
    assert result.exit_code == 2, result.output
    assert "vllm-l40s serves no model: none fits on L40S" in " ".join(result.output.split())


# ## Warm-up


def test_warm_wakes_every_model_and_keeps_them_warm_with_the_hourly_cost(matrix, tmp_path):
    fast_scaledown = tmp_path / "models.yaml"  # a 3 s scaledown window: a ping every second
    fast_scaledown.write_text(config.DEFAULT_PATH.read_text().replace(
        "scaledown_window_seconds: 900", "scaledown_window_seconds: 3"))
    upstream = standin(ready_after=1.0)  # refuses connections for its first second
    with gateway_before(matrix, upstream) as url:
        result = run("--warm", "h100", "--base-url", url, "--api-key", KEY, "--keep-warm", "3s",
                     "--config", str(fast_scaledown), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [w["model"] for w in report["models"]] == H100_MODELS
    assert all(w["ok"] and w["ready_after_s"] >= 0.8 and w["attempts"] > 1
               for w in report["models"])
    kept = report["keep_warm"]
    # 3 replicas of one H100 each ($3.95 + 4 cores x $0.04716 + 14 GiB x $0.007992 =
    # $4.250528/h) and the app's CPU router (1 core + 1 GiB = $0.055152/h): $12.806736/h.
    assert kept["interval_s"] == 1.0 and kept["usd_per_hour"] == 12.81
    assert kept["usd_per_hour_split"] == {"gpu": 11.85, "cpu": 0.5659, "memory": 0.3357,
                                          "router": 0.0552}
    assert kept["usd"] == round(12.81 * 3 / 3600, 4)
    # The replicas stay up (and billed) for the scaledown window after the last ping.
    assert kept["scaledown_window_s"] == 3 and kept["usd_scaledown_tail"] == round(
        12.81 * 3 / 3600, 4)
    assert kept["failed_pings"] == 0 and kept["pings"] == 2 * 3  # rounds at 1 s and 2 s
    pings = [r for r in upstream.received if r["path"] == "/v1/completions"
             and r["body"]["max_tokens"] == 1]
    assert {p["body"]["model"] for p in pings} == {m.name for m in matrix.models.values()}


def test_warm_at_your_own_endpoint_wakes_the_models_it_lists(matrix):
    """As the suite does: one of the h100 app's models behind --serve-local is woken, the
    others are named, not failed; a model asked for by name is woken whatever is listed."""
    with gateway_before(matrix, standin(), models=["gemma-3-12b"]) as url:
        result = run("--warm", "h100", "--base-url", url, "--api-key", KEY, "--json")
        text = run("--warm", "h100", "--base-url", url, "--api-key", KEY)
        named = run("--warm", "h100", "--base-url", url, "--api-key", KEY, "--test-model",
                    "qwen3-vl-30b", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [w["model"] for w in report["models"]] == ["gemma-3-12b"]
    assert report["not_served"] == ["gemma-3-27b", "qwen3-vl-30b"]
    assert text.exit_code == 0 and (f"Not served at {url} (not woken): gemma-3-27b, "
                                    "qwen3-vl-30b.") in " ".join(text.stdout.split())
    assert named.exit_code == 1
    (woken,) = json.loads(named.stdout)["models"]
    assert not woken["ok"] and woken["reason"].startswith("HTTP 404")


def test_warm_prints_each_models_readiness_and_what_warm_replicas_cost(matrix):
    with gateway_before(matrix, standin(), models=["gemma-3-27b"]) as url:
        result = run("--warm", "gemma-3-27b-l40s", "--base-url", url, "--api-key", KEY,
                     "--keep-warm", "1s")
    assert result.exit_code == 0, result.output
    assert "gemma-3-27b │ ready" in result.stdout
    # Two L40S per replica for gemma-3-27b (2 x $1.95/h), 5 cores (x $0.04716) and 20 GiB
    # (x $0.007992) reserved: $4.29564/h. A legacy app has no router.
    assert ("$4.30/hour while it runs (gemma-3-27b $4.30/h; one replica per model; $3.90 GPU "
            "+ $0.24 CPU + $0.16 memory)") in " ".join(result.stderr.split())
    # 900 s of scaledown after the last ping at $4.30/h: $1.075.
    assert ("Kept warm for 1 s: 0 pings, 0 failed; about $0.00 at $4.30/hour, plus up to $1.07 "
            "while the replicas idle out the 900 s scaledown window.") in result.stdout


@pytest.mark.parametrize(("answer", "ok", "reason"), [
    ((200, {"choices": [{"text": " there", "finish_reason": "length"}]}, []), True, ""),
    ((200, {}, []), False, "HTTP 200 without a completion: the answer has no choices"),
    ((200, b"<html>Modal</html>", []), False, "HTTP 200 without a completion: the answer has no choices"),
    ((404, {"error": {"message": "no such model"}}, []), False, "HTTP 404: no such model"),
])
def test_a_model_is_ready_only_when_a_completion_comes_back(matrix, answer, ok, reason):
    async def wake(url):
        async with checks.Endpoint(url, KEY, deadline_s=5) as endpoint:
            return await checks.wake(endpoint, matrix.models["gemma-3-12b"])

    with ThreadServer(Scripted(answer)) as server:
        woken = asyncio.run(wake(server.url))
    assert (woken.ok, woken.reason, woken.attempts) == (ok, reason, 1)


# ## The retrying client on its own


class Scripted:
    """An ASGI app answering each request with the next scripted (status, body, headers)."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.seen: list[tuple[str, str]] = []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return
        self.seen.append((scope["method"], scope["path"]))
        status, body, headers = self.answers.pop(0)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), *headers]})
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()  # bytes: as is
        await send({"type": "http.response.body", "body": raw})


async def _send(url, *args, deadline=5.0, **kw):
    async with checks.Endpoint(url, "k", deadline_s=deadline) as endpoint:
        return await endpoint.send(*args, **kw)


def test_503s_are_retried_with_backoff_and_the_wait_reported_apart():
    starting = (503, {"error": {"message": "starting"}}, [])
    app = Scripted(starting, starting, (200, {"ok": 1}, []))
    with ThreadServer(app) as server:
        answer = asyncio.run(_send(server.url, "GET", "/v1/models"))
    assert answer.status == 200 and answer.attempts == 3 and answer.json() == {"ok": 1}
    assert answer.waited >= 0.25 + 0.5 and answer.latency < 0.5


def test_modal_303_redirects_are_followed_to_the_result():
    app = Scripted((303, {}, [(b"location", b"/result/fc-1")]), (200, {"done": True}, []))
    with ThreadServer(app) as server:
        answer = asyncio.run(_send(server.url, "POST", "/v1/completions", {"prompt": "x"}))
    assert answer.status == 200 and answer.json() == {"done": True}
    assert app.seen == [("POST", "/v1/completions"), ("GET", "/result/fc-1")]


def test_nothing_listening_is_retried_until_a_shorter_deadline():
    started = time.monotonic()
    port = free_port()
    with pytest.raises(checks.NotReady, match=rf"deadline \(1 s\).*last: connection refused "
                                              rf"\(127.0.0.1:{port}\)"):
        asyncio.run(_send(f"http://127.0.0.1:{port}", "GET", "/health", deadline=1))
    assert 0.5 < time.monotonic() - started < 3


def test_a_refusing_url_that_is_not_modal_fails_after_the_grace(monkeypatch):
    """Long before the deadline, with the reason; every failed try was reported on the way."""
    monkeypatch.setattr(checks, "UNREACHABLE_GRACE", 1.0)
    port, seen = free_port(), []

    async def send():
        async with checks.Endpoint(f"http://127.0.0.1:{port}", "k", deadline_s=600,
                                   on_wait=seen.append) as endpoint:
            return await endpoint.send("GET", "/health")

    started = time.monotonic()
    with pytest.raises(checks.Unreachable) as caught:
        asyncio.run(send())
    took = time.monotonic() - started
    assert 1.0 <= took < 10, took  # the grace, not the next doubling of the backoff (2 s)
    assert str(caught.value) == (
        f"http://127.0.0.1:{port}: connection refused for 1 s: nothing listens at "
        f"127.0.0.1:{port}. Check the URL; a vLLM server still loading its model refuses "
        "connections until it is ready: run this again once it listens")
    assert caught.value.exit_code == 1
    assert len(seen) >= 2 and set(seen) == {f"connection refused (127.0.0.1:{port})"}


def test_a_name_that_does_not_resolve_fails_after_the_grace(monkeypatch):
    monkeypatch.setattr(checks, "UNREACHABLE_GRACE", 0.5)
    with pytest.raises(checks.Unreachable, match=r"^http://no-such-host\.invalid:8000: the name "
                                                 r"no-such-host\.invalid did not resolve for "):
        asyncio.run(_send("http://no-such-host.invalid:8000", "GET", "/health", deadline=600))


def test_a_modal_endpoint_that_refuses_is_retried_until_the_deadline(monkeypatch):
    """Modal's proxy never refuses while a container starts, so a refusal there (a network
    that drops and comes back) is waited for like any cold start. httpx's transport raises
    what httpcore raises for a refused socket: ConnectError('[Errno 111] Connection
    refused')."""
    monkeypatch.setattr(checks, "UNREACHABLE_GRACE", 0.2)

    def refuse(request):
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    async def send():
        async with checks.Endpoint("https://ws--vllm-h100-serve.modal.run", "k",
                                   deadline_s=1.5) as endpoint:
            await endpoint.client.aclose()
            endpoint.client = httpx.AsyncClient(base_url=endpoint.base_url,
                                                transport=httpx.MockTransport(refuse))
            return await endpoint.send("GET", "/health")

    with pytest.raises(checks.NotReady, match=r"deadline \(1.5 s\).*last: connection refused "
                                              r"\(ws--vllm-h100-serve.modal.run\)"):
        asyncio.run(send())


def test_a_server_that_starts_listening_within_the_grace_is_waited_for(monkeypatch):
    """A socket bound but not yet listening refuses, as a restarting server does; it starts
    listening after 0.5 s and answers."""
    monkeypatch.setattr(checks, "UNREACHABLE_GRACE", 10.0)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))

    def listen_later():
        time.sleep(0.5)
        sock.listen()
        conn, _ = sock.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                         b"content-length: 2\r\nconnection: close\r\n\r\n{}")

    thread = threading.Thread(target=listen_later, daemon=True)
    thread.start()
    try:
        answer = asyncio.run(_send(f"http://127.0.0.1:{sock.getsockname()[1]}", "GET",
                                   "/health", deadline=60))
    finally:
        thread.join(timeout=10)
        sock.close()
    assert answer.status == 200 and answer.attempts >= 2 and answer.waited >= 0.4


def test_piped_the_cli_says_why_it_waits_once_not_per_retry_then_fails(monkeypatch):
    monkeypatch.setattr(checks, "UNREACHABLE_GRACE", 1.0)
    port = free_port()
    started = time.monotonic()
    result = run("--warm", "h100", "--base-url", f"http://127.0.0.1:{port}", "--api-key", KEY)
    assert time.monotonic() - started < 10
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"waiting (0 s so far): connection refused (127.0.0.1:{port})",
        (f"Error: http://127.0.0.1:{port}: connection refused for 1 s: nothing listens at "
         f"127.0.0.1:{port}. Check the URL; a vLLM server still loading its model refuses "
         "connections until it is ready: run this again once it listens")]


def test_piped_a_cold_start_prints_each_new_reason_once(matrix):
    upstream = standin(ready_after=1.5)  # refuses connections until then: the gateway's 503
    with gateway_before(matrix, upstream) as url:
        result = run("--warm", "h100", "--test-model", "gemma-3-12b", "--base-url", url,
                     "--api-key", KEY)
    assert result.exit_code == 0, result.output
    waits = [line for line in result.stderr.splitlines() if line.startswith("waiting")]
    assert [w.split(": ", 1)[1] for w in waits] == [
        "HTTP 503: backend for 'google/gemma-3-12b-it' is starting or down: connection refused"], \
        result.stderr


# ## Client-side verifiers


SQL_SENTENCES = ["SELECT id FROM users", "SELECT id FROM orders", "SELECT name FROM users",
                 "SELECT name FROM orders"]


def test_the_grammar_check_accepts_exactly_the_sql_grammars_language():
    language = checks.grammar_regex(checks.SQL_GRAMMAR)
    assert all(language.fullmatch(s) for s in SQL_SENTENCES)
    for other in ["SELECT * FROM users", "select id from users", "SELECT id FROM users;",
                  "SELECT  id FROM users", "SELECT id FROM", " SELECT id FROM users", ""]:
        assert not language.fullmatch(other), other
    assert language.fullmatch(from_grammar(checks.SQL_GRAMMAR))
    repeat = checks.grammar_regex('root ::= ("a" | "b")+ tail?\ntail ::= [0-9]')
    assert repeat.fullmatch("abba7") and repeat.fullmatch("a") and not repeat.fullmatch("7")
    with pytest.raises(ValueError, match="undefined or recursive"):
        checks.grammar_regex('root ::= "x" root')


@pytest.mark.parametrize(("value", "errors"), [
    ({"name": "John", "age": 30, "city": "NYC"}, []),
    ({"name": "John", "age": 30}, ["$: missing required 'city'"]),
    ({"name": "John", "age": "30", "city": "NYC"}, ["$.age: expected integer, got string"]),
    ({"name": "John", "age": True, "city": "NYC"}, ["$.age: expected integer, got boolean"]),
    ({"name": "John", "age": 30.5, "city": None}, ["$.age: expected integer, got number",
                                                   "$.city: expected string, got null"]),
    (["John", 30, "NYC"], ["$: expected object, got array"]),
])
def test_the_schema_check_names_each_violation(value, errors):
    assert checks.schema_errors(checks.PERSON_SCHEMA, value) == errors


def test_the_structured_outputs_sent_are_the_specs_examples():
    assert checks.EMAIL_REGEX == "\\w+@\\w+\\.com"
    assert checks.SQL_GRAMMAR == ("root ::= \"SELECT \" column \" FROM \" table\n"
                                  "column ::= \"id\" | \"name\"\ntable ::= \"users\" | \"orders\"")
    assert checks.SENTIMENTS == ["Positive", "Negative", "Neutral"]
    assert checks.PERSON_SCHEMA["required"] == ["name", "age", "city"]
    assert checks.NAME_AGE_SCHEMA["required"] == ["name", "age"]


def test_lora_adapters_listed_under_a_served_model_are_not_extra_models(matrix):
    listing = {"object": "list", "data": [
        {"id": "google/gemma-3-12b-it", "parent": None},
        {"id": "gemma-3-12b-sql", "parent": "google/gemma-3-12b-it"},
        {"id": "someone-elses", "parent": "other/model"}]}
    with ThreadServer(Scripted((200, listing, []))) as server:
        async def listed():
            async with checks.Endpoint(server.url, KEY, deadline_s=5) as endpoint:
                await checks.check_models(checks._Probe(endpoint), [matrix.models["gemma-3-12b"]])

        with pytest.raises(checks.CheckFailed, match=r"^not expected someone-elses$"):
            asyncio.run(listed())


def _check(url, check, *args):
    async def run():
        async with checks.Endpoint(url, KEY, deadline_s=5) as endpoint:
            return await checks._run_check(endpoint, "check", "m", check, *args)

    return asyncio.run(run())


@pytest.mark.parametrize(("check", "answer", "reason"), [
    ("chat", {"choices": {"0": {"message": {"content": "hi"}}}}, "malformed answer (KeyError"),
    ("chat", {"choices": [{"message": {"content": ["hi"]}}]}, "the answer's first choice has no"),
    ("completion", [1, 2], "the answer has no choices"),
    ("models", {"data": None}, "the listing has no data"),
    ("chat.stream", b"data: [1]\n\ndata: [DONE]\n\n", "malformed answer (AttributeError"),
    ("chat.stream", b'data: {"choices": [{"delta": {"content": 7}}]}\n\n',
     "malformed answer (TypeError"),
])
def test_an_answer_of_the_wrong_shape_fails_its_check_with_a_reason(matrix, check, answer,
                                                                    reason):
    model = matrix.models["gemma-3-12b"]
    function, arg = ((checks.check_models, [model]) if check == "models"
                     else (checks.MODEL_CHECKS[check], model))
    with ThreadServer(Scripted((200, answer, []))) as server:
        result = _check(server.url, function, arg)
    assert result.passed is False
    assert result.reason.startswith(reason), result.reason


# ## LoRA adapters: one completion each, under the adapter's own name


@pytest.mark.parametrize("serves_math", [True, False])
def test_each_adapter_gets_a_completion(tmp_path, serves_math):
    from test_adapters import matrix_with

    matrix = matrix_with(tmp_path)
    adapters = ["python", "math"] if serves_math else ["python"]  # as vLLM's --lora-modules
    upstream = StandIn([*standin().names, *adapters])
    with gateway_before(matrix, upstream) as url:
        report = suite(url, "--config", str(matrix.path), "--test-model", "qwen3-vl-30b",
                       expect=0 if serves_math else 1)
    adapter_checks = [(c["check"], c["passed"]) for c in report["checks"]
                      if c["check"].startswith("adapter.")]
    assert adapter_checks == [("adapter.python", True), ("adapter.math", serves_math)]
    assert report["checks"][-1]["check"] == "adapter.math"  # after the model's own checks
    assert len(report["checks"]) == checks.planned_checks([matrix.models["qwen3-vl-30b"]])
    assert {b["body"]["model"] for b in upstream.received if "body" in b
            and isinstance(b["body"], dict)} >= {"python"}
    if not serves_math:
        assert "404" in reasons(report, "adapter.math")[0]


def test_keeping_a_gpu_app_warm_counts_its_router(matrix, capsys):
    import plan

    target = checks.resolve_target(matrix, plan.gpu_app(matrix, "h100"), test_model="gemma-3-12b",
                                   base_url="http://x", api_key=None, deadline_s=None)
    checks._say_keep_warm(target, 7200, 300)
    text = " ".join(capsys.readouterr().err.split())
    # One H100 replica ($4.250528/h) and the router ($0.055152/h) the pings go through.
    assert ("Keeping 1 replica(s) warm for 7200 s, a ping every 300 s: $4.31/hour while it runs "
            "(gemma-3-12b $4.25/h, the CPU router $0.06/h; one replica per model; $3.95 GPU + "
            "$0.19 CPU + $0.11 memory + $0.06 router)") in text
