"""Batch runs (`deploy.py --batch KEY --input FILE`) through the real gateway in front of
stand-in vLLM servers on loopback: a mixed file, every file-check error, a stand-in slow to
start, one that fails some requests, resume after a real Ctrl-C with no request answered
twice, the output format field by field, and the cost estimate with Modal patched at
`cloud`'s boundary."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from batch_standins import Failing
from openai.types import Completion
from openai.types.chat import ChatCompletion
from servers import ROOT_DIR, ThreadServer, free_port, wait_until
from standin import StandIn, standin_server
from typer.testing import CliRunner

import batch
import config
import deploy
import gateway

KEY = "sk-batch-test-key-0123456789"
SERVED = {"gemma-3-12b": "google/gemma-3-12b-it", "gemma-3-27b": "google/gemma-3-27b-it",
          "qwen3-vl-30b": "Qwen/Qwen3-VL-30B-A3B-Instruct"}
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
ANSWER_ID = re.compile(r"batch_req_[0-9a-f]{32}")


def standin(**behaviour) -> StandIn:
    return StandIn(list(SERVED.values()), **behaviour)


@contextmanager
def gateway_before(matrix, upstreams: dict, models=tuple(SERVED)):
    """The gateway as --serve-local builds it, in a thread, in front of stand-ins (one app
    for every model, or {model key: app}). A stand-in not ready yet refuses connections
    until it is, as vLLM does."""
    with ExitStack() as stack:
        servers = {}
        for key in models:
            app = upstreams.get(key, upstreams.get("*"))
            if id(app) not in servers:
                late = isinstance(app, StandIn) and app.ready_at > time.monotonic()
                servers[id(app)] = stack.enter_context(
                    standin_server(app, wait=False) if late else ThreadServer(app))
        urls = {key: servers[id(upstreams.get(key, upstreams.get("*")))].url for key in models}
        served = [matrix.models[k] for k in models]
        app = gateway.build_app(served, gateway.HTTPBackend(urls), api_key=KEY)
        with ThreadServer(app) as gw:
            yield gw.url


def line(cid: str, model: str | None = "gemma-3-12b", *, url: str = CHAT,
         prompt: str | None = None, **extra) -> dict:
    prompt = prompt or f"question {cid}"
    body = ({"messages": [{"role": "user", "content": prompt}]} if url == CHAT
            else {"prompt": prompt})
    body |= {"max_tokens": 8, **extra}
    if model is not None:
        body["model"] = model
    return {"custom_id": cid, "method": "POST", "url": url, "body": body}


def write(path: Path, items) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in items),
                    encoding="utf-8")
    return path


def read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def run(*args: str, env: dict | None = None):
    return CliRunner().invoke(deploy.cli, list(args), env={"COLUMNS": "200", **(env or {})})


def batch_run(url: str, path: Path, *args: str, key: str = "h100", expect: int = 0) -> dict:
    result = run("--batch", key, "--input", str(path), "--base-url", url, "--api-key", KEY,
                 "--json", *args)
    assert result.exit_code == expect, result.output
    return json.loads(result.stdout)


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Runs save their summary under ./results: here, a temporary directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def received(app: StandIn) -> list[str]:
    """The prompts a stand-in received, in order (one per request it answered or refused)."""
    return [(r["body"].get("prompt") or r["body"]["messages"][-1]["content"])
            for r in app.received if isinstance(r["body"], dict)]


# ## A mixed file through the gateway: chat and completions, two models, any model name


def test_a_mixed_file_is_answered_once_per_request_in_openais_output_shape(matrix, tmp_path):
    upstream = standin()
    items = [line("c1", "gemma-3-12b"), line("c2", "GOOGLE/GEMMA-3-12B-IT", url=COMPLETIONS),
             line("c3", "Qwen/Qwen3-VL-30B-A3B-Instruct"), line("c4", "qwen3-vl-30b",
                                                                url=COMPLETIONS),
             line("c5", None, prompt="no model named")]
    path = write(tmp_path / "mixed.jsonl", items)
    with gateway_before(matrix, {"*": upstream}) as url:
        summary = batch_run(url, path, "--test-model", "qwen3-vl-30b")
    answers = {a["custom_id"]: a for a in read(tmp_path / "mixed.output.jsonl")}
    assert sorted(answers) == ["c1", "c2", "c3", "c4", "c5"]
    assert (tmp_path / "mixed.errors.jsonl").read_text() == ""
    models = {"c1": "gemma-3-12b", "c2": "gemma-3-12b", "c3": "qwen3-vl-30b",
              "c4": "qwen3-vl-30b", "c5": "qwen3-vl-30b"}
    for cid, answer in answers.items():
        body = answer["response"]["body"]
        assert answer["response"]["status_code"] == 200
        assert body["model"] == SERVED[models[cid]]  # vLLM receives the served name
        kind = ChatCompletion if items[int(cid[1]) - 1]["url"] == CHAT else Completion
        kind.model_validate(body)  # a real chat.completion / text_completion
    assert received(upstream).count("no model named") == 1  # --test-model filled it in
    usage = {m: [a["response"]["body"]["usage"] for c, a in answers.items() if models[c] == m]
             for m in ("gemma-3-12b", "qwen3-vl-30b")}
    assert set(summary["models"]) == {"gemma-3-12b", "qwen3-vl-30b"}
    for key, stats in summary["models"].items():
        assert stats["requests_ok"] == len(usage[key]) and stats["requests_failed"] == 0
        assert stats["prompt_tokens"] == sum(u["prompt_tokens"] for u in usage[key])
        assert stats["completion_tokens"] == sum(u["completion_tokens"] for u in usage[key])
    totals = summary["totals"]
    assert totals["requests_ok"] == 5 and totals["requests_failed"] == 0
    assert totals["completion_tokens"] == sum(
        s["completion_tokens"] for s in summary["models"].values())


def test_the_summary_has_the_shape_the_report_reads_and_is_saved(matrix, tmp_path):
    path = write(tmp_path / "evals.jsonl", [line(f"r{i}") for i in range(3)])
    with gateway_before(matrix, {"*": standin()}) as url:
        summary = batch_run(url, path)
    (saved,) = (tmp_path / "results").glob("batch-evals-*.json")
    assert re.fullmatch(r"batch-evals-\d{8}T\d{6}Z\.json", saved.name)
    assert json.loads(saved.read_text()) == summary
    assert set(summary) == {"kind", "version", "app", "gpu", "endpoint", "input", "output",
                            "errors", "started_at", "wall_s", "cost_is_estimate", "models",
                            "totals"}
    assert summary["kind"] == "modal-vllm-batch" and summary["version"] == 1
    assert summary["app"] == "vllm-h100" and summary["endpoint"] == url
    assert summary["gpu"] is None  # --base-url: whatever serves it, not known to be an H100
    assert summary["input"] == str(path) and summary["output"].endswith("evals.output.jsonl")
    assert summary["errors"].endswith("evals.errors.jsonl") and summary["cost_is_estimate"]
    assert summary["started_at"].endswith("+00:00")
    fields = {"requests_ok", "requests_failed", "prompt_tokens", "completion_tokens", "wall_s",
              "requests_per_s", "output_tokens_per_s", "replicas_seen", "usd_estimate",
              "cost_basis"}
    stats = summary["models"]["gemma-3-12b"]
    assert set(stats) == fields and set(summary["totals"]) == fields
    assert stats["usd_estimate"] is None and stats["replicas_seen"] is None
    assert stats["cost_basis"].startswith("no estimate: a --base-url endpoint")
    assert 0 < stats["wall_s"] <= summary["wall_s"]
    assert stats["requests_per_s"] == pytest.approx(3 / stats["wall_s"], rel=0.01)
    assert stats["output_tokens_per_s"] == pytest.approx(
        stats["completion_tokens"] / stats["wall_s"], rel=0.01)


def test_the_text_summary_names_files_cost_and_no_progress_when_piped(matrix, tmp_path):
    path = write(tmp_path / "a.jsonl", [line("x"), line("y", "qwen3-vl-30b")])
    with gateway_before(matrix, {"*": standin()}) as url:
        result = run("--batch", "h100", "--input", str(path), "--base-url", url,
                     env={"VLLM_API_KEY": KEY})
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "gemma-3-12b" in out and "qwen3-vl-30b" in out and "total" in out
    assert f"Output: {tmp_path / 'a.output.jsonl'}" in out and "Errors:" in out
    assert "Cost: no estimate: a --base-url endpoint" in out
    assert "Saved results/batch-a-" in out
    assert "Report      results/report.html updated" in out
    assert result.stderr == ""  # piped: no progress bar, nothing but the summary
    assert KEY not in result.output


def test_a_run_goes_to_results_dir_and_updates_its_results_page(matrix, tmp_path):
    path = write(tmp_path / "a.jsonl", [line("x"), line("y", "qwen3-vl-30b")])
    runs = tmp_path / "runs"
    with gateway_before(matrix, {"*": standin()}) as url:
        result = run("--batch", "h100", "--input", str(path), "--base-url", url, "--json",
                     "--results-dir", str(runs), env={"VLLM_API_KEY": KEY})
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # stdout stays one JSON document
    (saved,) = runs.glob("batch-a-*.json")
    assert json.loads(saved.read_text()) == summary
    assert result.stderr == f"Report      {runs / 'report.html'} updated (deploy.py --report; " \
                            "open it in a browser)\n"
    page = (runs / "report.html").read_text()
    assert 'id="batch-1-table"' in page and "<h3>a.jsonl on " in page
    assert "qwen3-vl-30b" in page and "gemma-3-12b" in page
    assert not (tmp_path / "results").exists()


def test_requests_of_several_models_run_side_by_side(matrix, tmp_path):
    """The file lists every gemma request first; qwen's are answered while gemma's (slow)
    are still running, instead of after them."""
    slow, fast = standin(delay=0.4), standin()
    items = [line(f"g{i}") for i in range(8)] + [line(f"q{i}", "qwen3-vl-30b") for i in range(8)]
    path = write(tmp_path / "sorted.jsonl", items)
    with gateway_before(matrix, {"gemma-3-12b": slow, "qwen3-vl-30b": fast},
                        models=("gemma-3-12b", "qwen3-vl-30b")) as url:
        batch_run(url, path, "--concurrency", "4")
    order = [a["custom_id"] for a in read(tmp_path / "sorted.output.jsonl")]
    assert sorted(order) == sorted(x["custom_id"] for x in items)
    last_gemma = max(i for i, c in enumerate(order) if c.startswith("g"))
    assert order.index("q7") < last_gemma  # every qwen answer came before gemma's last


def test_a_single_model_app_needs_no_model_in_the_lines(matrix, tmp_path):
    upstream = StandIn(["google/gemma-3-12b-it"])
    path = write(tmp_path / "one.jsonl", [line("a", None), line("b", None, url=COMPLETIONS)])
    with gateway_before(matrix, {"*": upstream}, models=("gemma-3-12b",)) as url:
        summary = batch_run(url, path, key="gemma-3-12b-l40s")
    assert summary["app"] == "vllm-gemma-3-12b-l40s"
    assert summary["models"]["gemma-3-12b"]["requests_ok"] == 2
    assert {r["body"]["model"] for r in upstream.received} == {"google/gemma-3-12b-it"}


# ## The file check: every problem, with its line, exit 2, nothing sent

VALID = line("ok-1")


@pytest.mark.parametrize(("bad", "message"), [
    ('{"custom_id": "x", "method": "POST",', "not valid JSON (Expecting"),
    ("[1, 2]", "not a JSON object"),
    (b'{"custom_id": "\xff"}', "not valid JSON (not UTF-8)"),
    ({**line("x"), "custom_id": None}, "custom_id is missing"),
    ({k: v for k, v in line("x").items() if k != "custom_id"}, "custom_id is missing"),
    ({**line("x"), "custom_id": 7}, "custom_id must be a non-empty string"),
    ({**line("x"), "custom_id": ""}, "custom_id must be a non-empty string"),
    (line("ok-1", prompt="again"), 'custom_id "ok-1" is a duplicate (first on line 1)'),
    ({**line("x"), "method": "GET"}, 'method "GET" is not served; use "POST"'),
    ({**line("x"), "url": "/v1/embeddings"},
     'url "/v1/embeddings" is not served; use /v1/chat/completions or /v1/completions'),
    ({**line("x"), "url": "/v1/responses"}, 'url "/v1/responses" is not served'),
    ({k: v for k, v in line("x").items() if k != "body"}, "body is missing"),
    ({**line("x"), "body": "hello"}, "body must be a JSON object"),
    (line("x", "llama-3.1-8b"), ('body.model "llama-3.1-8b" is not served by vllm-h100; '
                                 "it serves gemma-3-12b, gemma-3-27b, qwen3-vl-30b")),
    (line("x", 42), 'body.model 42 is not served by vllm-h100'),
    (line("x", None), ("body.model is missing; name the model or give --test-model "
                       "(vllm-h100 serves gemma-3-12b, gemma-3-27b, qwen3-vl-30b)")),
    (line("x", stream=True), "body.stream is set; a batch takes whole answers (remove it)"),
])
def test_each_file_problem_is_one_line_with_its_number_and_nothing_is_sent(tmp_path, bad,
                                                                           message):
    upstream = standin()
    path = tmp_path / "in.jsonl"
    bad = bad if isinstance(bad, bytes) else (bad if isinstance(bad, str) else
                                              json.dumps(bad)).encode()
    path.write_bytes(json.dumps(VALID).encode() + b"\n\n" + bad + b"\n")  # line 2 is blank
    with ThreadServer(upstream) as server:
        result = run("--batch", "h100", "--input", str(path), "--base-url", server.url,
                     "--api-key", KEY)
    assert result.exit_code == 2, result.output
    errors = result.stderr.splitlines()
    assert errors[0].startswith(f"Error: {path}:3: {message}"), result.stderr
    assert upstream.received == []
    assert not (tmp_path / "in.output.jsonl").exists() and not (tmp_path / "results").exists()


def test_every_problem_of_a_line_and_of_the_file_is_listed(tmp_path):
    items = [VALID, {"custom_id": "ok-1", "method": "PUT", "url": "/v2/x", "body": {}},
             "not json"]
    path = write(tmp_path / "in.jsonl", items)
    result = run("--batch", "h100", "--input", str(path), "--dry-run")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f'Error: {path}:2: method "PUT" is not served; use "POST"',
        (f'Error: {path}:2: url "/v2/x" is not served; use /v1/chat/completions or '
         "/v1/completions"),
        (f"Error: {path}:2: body.model is missing; name the model or give --test-model "
         "(vllm-h100 serves gemma-3-12b, gemma-3-27b, qwen3-vl-30b)"),
        f'Error: {path}:2: custom_id "ok-1" is a duplicate (first on line 1)',
        f"Error: {path}:3: not valid JSON (Expecting value)",
    ]


def test_a_broken_big_file_shows_the_first_problems_and_counts_the_rest(tmp_path):
    path = write(tmp_path / "in.jsonl", ["{"] * (batch.MAX_PROBLEMS + 7))
    result = run("--batch", "h100", "--input", str(path), "--dry-run")
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert len(lines) == batch.MAX_PROBLEMS + 1
    assert lines[-1] == f"Error: {path}: 7 more problem(s) not shown"


def test_a_model_of_another_app_is_not_served_by_a_legacy_app(tmp_path):
    path = write(tmp_path / "in.jsonl", [line("a", "qwen3-vl-30b")])
    result = run("--batch", "gemma-3-12b-l40s", "--input", str(path), "--dry-run")
    assert result.exit_code == 2
    assert (f'{path}:1: body.model "qwen3-vl-30b" is not served by vllm-gemma-3-12b-l40s; '
            "it serves gemma-3-12b") in result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--batch", "h100"], "--batch needs --input FILE"),
    (["--batch", "h999", "--input", "in.jsonl"], "unknown key 'h999'"),
    (["--batch", "h100", "--input", "missing.jsonl"], "--input missing.jsonl: cannot read it"),
    (["--batch", "h100", "--input", "in.jsonl", "-o", "-"], "give -o FILE, not -"),
    (["--batch", "h100", "--input", "in.jsonl", "-o", "in.jsonl"], "would overwrite the input"),
    (["--batch", "h100", "--input", "in.jsonl", "--concurrency", "0"],
     "--concurrency must be at least 1, not 0"),
    (["--batch", "h100", "--input", "in.jsonl", "--test-model", "nope"], "unknown model 'nope'"),
    (["--batch", "gemma-3-12b-l40s", "--input", "in.jsonl", "--test-model", "qwen3-vl-30b"],
     "vllm-gemma-3-12b-l40s does not serve 'qwen3-vl-30b'"),
    (["--batch", "h100", "--input", "in.jsonl", "--keep-warm", "1h"],
     "--keep-warm goes with --warm, not --batch"),
    (["--bench", "h100", "--input", "in.jsonl"], "--input goes with --batch, not --bench"),
    (["--gpu", "h100", "--input", "in.jsonl"], "--input goes with --batch, not --gpu"),
])
def test_usage_errors_exit_2_before_anything_is_sent(tmp_path, args, message):
    write(tmp_path / "in.jsonl", [VALID])
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr


def test_the_dry_run_counts_per_model_and_url_and_sends_nothing(tmp_path):
    items = [line("a"), line("b", url=COMPLETIONS), line("c", "Qwen/Qwen3-VL-30B-A3B-Instruct"),
             line("d")]
    path = write(tmp_path / "in.jsonl", items)
    result = run("--batch", "h100", "--input", str(path), "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "input": str(path), "requests": 4, "output": str(tmp_path / "in.output.jsonl"),
        "models": {"gemma-3-12b": {CHAT: 2, COMPLETIONS: 1}, "qwen3-vl-30b": {CHAT: 1}},
        "already_answered": 0, "to_send": 4}
    write(tmp_path / "in.output.jsonl", [answer_line("a", 200), answer_line("b", 400)])
    text = run("--batch", "h100", "--input", str(path), "--dry-run")
    assert text.exit_code == 0
    assert "in.jsonl: 4 requests, every line valid" in text.stdout
    assert re.search(r"gemma-3-12b\s+│\s+/v1/chat/completions\s+│\s+2", text.stdout)
    assert "Already answered in" in text.stdout and "a run sends the other 3." in text.stdout
    assert "Dry run: nothing sent." in text.stdout
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "in.output.jsonl"]  # untouched


# ## A stand-in slow to start, one that fails some requests


def test_a_cold_start_is_waited_through(matrix, tmp_path):
    upstream = standin(ready_after=1.5)  # refuses connections until then: the gateway's 503s
    path = write(tmp_path / "cold.jsonl", [line(f"r{i}") for i in range(4)])
    with gateway_before(matrix, {"*": upstream}) as url:
        summary = batch_run(url, path, "--deadline", "60s")
    assert summary["totals"]["requests_ok"] == 4 and summary["totals"]["requests_failed"] == 0
    assert len(upstream.received) == 4  # the 503s were retried until each got through once
    assert summary["models"]["gemma-3-12b"]["wall_s"] >= 1.0
    assert {a["response"]["status_code"] for a in read(tmp_path / "cold.output.jsonl")} == {200}


def test_an_endpoint_not_listening_yet_is_waited_for(matrix, tmp_path):
    """Connection refused at first (vLLM does not listen until it is ready): retried."""
    import threading

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(standin(), host="127.0.0.1", port=port,
                                           log_level="critical", lifespan="off"))
    thread = threading.Timer(1.0, server.run)
    thread.start()
    try:
        path = write(tmp_path / "late.jsonl", [line("a", "google/gemma-3-12b-it")])
        summary = batch_run(f"http://127.0.0.1:{port}", path, "--deadline", "60s")
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert summary["totals"]["requests_ok"] == 1
    assert summary["models"]["gemma-3-12b"]["wall_s"] >= 0.5


class Redirecting:
    """Modal's answer to a web call longer than 150 s: 303 to a URL that serves the result."""

    def __init__(self):
        self.inner, self.paths = standin(), []

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            self.paths.append((scope["method"], scope["path"]))
            if scope["method"] == "POST":
                self.body = b""
                while True:
                    message = await receive()
                    self.body += message.get("body", b"")
                    if not message.get("more_body"):
                        break
                return await self._redirect(send)
            if scope["path"] == "/result/1":
                body = self.body

                async def replay():
                    return {"type": "http.request", "body": body, "more_body": False}

                scope = {**scope, "method": "POST", "path": CHAT}
                return await self.inner(scope, replay, send)
        return await self.inner(scope, receive, send)

    @staticmethod
    async def _redirect(send):
        await send({"type": "http.response.start", "status": 303,
                    "headers": [(b"location", b"/result/1"), (b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})


def test_modals_303_is_followed_to_the_answer(tmp_path):
    app = Redirecting()
    path = write(tmp_path / "long.jsonl", [line("a", "google/gemma-3-12b-it")])
    with ThreadServer(app) as server:
        batch_run(server.url, path)
    (answer,) = read(tmp_path / "long.output.jsonl")
    assert answer["response"]["status_code"] == 200
    assert answer["response"]["body"]["object"] == "chat.completion"
    assert app.paths == [("POST", CHAT), ("POST", CHAT), ("GET", "/result/1")]


def test_failed_requests_go_where_openai_puts_them(matrix, tmp_path):
    """A 4xx is an answer (output, with its status and body; not retried); a 503 is retried
    until it passes; a request that only ever gets 503 ends in the error file when its model
    has answered nothing for --deadline (the other model goes on)."""
    upstream = Failing(standin())
    items = [line("ok"), line("refused", prompt="status-400"),
             line("flaky", prompt="flaky-2 please"), line("q-ok", "qwen3-vl-30b"),
             line("never", "qwen3-vl-30b", prompt="always-503"),
             line("q-after", "qwen3-vl-30b")]
    path = write(tmp_path / "f.jsonl", items)
    with gateway_before(matrix, {"*": upstream}) as url:
        started = time.monotonic()
        summary = batch_run(url, path, "--deadline", "2s", "--concurrency", "1", expect=1)
    assert time.monotonic() - started < 30
    answers = {a["custom_id"]: a for a in read(tmp_path / "f.output.jsonl")}
    assert sorted(answers) == ["flaky", "ok", "q-ok", "refused"]
    refused = answers["refused"]["response"]
    assert refused["status_code"] == 400
    assert refused["body"]["error"]["message"] == "this request is refused on purpose"
    assert upstream.sends["status-400"] == 1  # an answer: never sent twice
    assert upstream.sends["flaky-2 please"] == 3 and answers["flaky"]["response"][
        "status_code"] == 200
    (never,) = read(tmp_path / "f.errors.jsonl")
    assert never["custom_id"] == "never" and never["response"] is None
    assert never["error"]["code"] == "deadline_exceeded"
    assert never["error"]["message"].startswith("no answer within the deadline (2 s)")
    assert "HTTP 503" in never["error"]["message"]
    gemma, qwen = summary["models"]["gemma-3-12b"], summary["models"]["qwen3-vl-30b"]
    assert (gemma["requests_ok"], gemma["requests_failed"]) == (2, 1)
    assert (qwen["requests_ok"], qwen["requests_failed"]) == (1, 1)
    assert received(upstream.inner).count("question q-after") == 0  # given up: not sent


def test_an_answer_that_is_not_json_goes_to_the_error_file(tmp_path):
    upstream = Failing(standin())  # no gateway: an endpoint that sends HTML with a 200
    path = write(tmp_path / "h.jsonl", [line("html", "google/gemma-3-12b-it", prompt="not-json"),
                                        line("fine", "google/gemma-3-12b-it")])
    with ThreadServer(upstream) as server:
        summary = batch_run(server.url, path, expect=1)
    (error,) = read(tmp_path / "h.errors.jsonl")
    assert error["custom_id"] == "html" and error["error"]["code"] == "invalid_response"
    assert error["error"]["message"].startswith(
        "HTTP 200: the answer is not a JSON object: '<html>Bad gateway</html>'")
    assert [a["custom_id"] for a in read(tmp_path / "h.output.jsonl")] == ["fine"]
    assert summary["totals"]["requests_failed"] == 1


def test_a_rejected_key_stops_the_run_and_says_how_to_resume(matrix, tmp_path):
    path = write(tmp_path / "k.jsonl", [line(f"r{i}") for i in range(5)])
    with gateway_before(matrix, {"*": standin()}) as url:
        result = run("--batch", "h100", "--input", str(path), "--base-url", url, "--api-key",
                     "sk-wrong-key-000000000")
    assert result.exit_code == 1, result.output
    assert "Stopped: the endpoint rejected the API key: HTTP 401: invalid API key" in result.stderr
    assert "Resume (sends every request without a 2xx answer): uv run deploy.py --batch h100" \
        in result.stderr
    assert "(and your --api-key: it is never printed)" in result.stderr
    assert "sk-wrong-key" not in result.output
    assert (tmp_path / "k.output.jsonl").read_text() == ""  # 401s are not answers to keep


def test_an_endpoint_that_goes_away_stops_the_run_keeping_the_answers(matrix, tmp_path,
                                                                       monkeypatch):
    """Your own server (not a Modal endpoint) dies mid-run: once it has refused connections
    for the grace period, the run stops as for a rejected key, keeping every answer, with
    its summary and the resume command (it used to end in a bare one-line error)."""
    import threading

    import checks

    monkeypatch.setattr(checks, "UNREACHABLE_GRACE", 1.0)
    path = write(tmp_path / "gone.jsonl", [line(f"r{i}", "google/gemma-3-12b-it")
                                           for i in range(60)])
    server = ThreadServer(standin(delay=0.05)).__enter__()
    stop = threading.Timer(0.6, server.__exit__, (None, None, None))
    stop.start()
    try:
        result = run("--batch", "h100", "--input", str(path), "--base-url", server.url,
                     "--concurrency", "2", "--test-model", "gemma-3-12b",
                     env={"VLLM_API_KEY": KEY})
    finally:
        stop.join()
    assert result.exit_code == 1, result.output
    assert f"Stopped: {server.url}: connection refused for 1 s" in result.stderr
    assert "Resume (sends every request without a 2xx answer): uv run deploy.py --batch h100" \
        in result.stderr
    answered = [a["custom_id"] for a in read(tmp_path / "gone.output.jsonl")]
    assert 0 < len(answered) < 60 and len(set(answered)) == len(answered)
    assert "total" in result.stdout  # the summary, as after any run


def test_a_failed_write_stops_the_run_in_one_line_keeping_what_was_written(matrix, tmp_path,
                                                                           monkeypatch):
    written = []

    def output_line(*args):
        if written:
            raise OSError(28, "No space left on device")
        written.append(args[0])
        return real(*args)

    real = batch.output_line
    monkeypatch.setattr(batch, "output_line", output_line)
    path = write(tmp_path / "d.jsonl", [line(f"r{i}") for i in range(6)])
    with gateway_before(matrix, {"*": standin()}) as url:
        result = run("--batch", "h100", "--input", str(path), "--base-url", url,
                     "--concurrency", "1", env={"VLLM_API_KEY": KEY})
    assert result.exit_code == 1, result.output
    (message,) = result.stderr.splitlines()
    assert message.startswith("Error: writing the answers failed: No space left on device; "
                              "every answer before it is kept. Resume: uv run deploy.py --batch")
    assert [a["custom_id"] for a in read(tmp_path / "d.output.jsonl")] == written == ["r0"]


def test_an_output_that_cannot_be_written_is_one_line(matrix, tmp_path):
    path = write(tmp_path / "w.jsonl", [line("a")])
    with gateway_before(matrix, {"*": standin()}) as url:
        result = run("--batch", "h100", "--input", str(path), "--base-url", url,
                     "-o", str(tmp_path / "no" / "such" / "dir.jsonl"), env={"VLLM_API_KEY": KEY})
    assert result.exit_code == 1
    assert result.stderr == (f"Error: {tmp_path / 'no' / 'such' / 'dir.jsonl'}: cannot write "
                             "it: No such file or directory\n")


# ## The output format, field by field (OpenAI's BatchRequestOutput; vLLM's run-batch too)


def answer_line(cid: str, status: int) -> dict:
    return {"id": f"batch_req_{'0' * 32}", "custom_id": cid,
            "response": {"status_code": status, "request_id": "req_x", "body": {"x": 1}},
            "error": None}


def test_each_output_and_error_line_has_exactly_openais_fields(matrix, tmp_path):
    upstream = Failing(standin())
    path = write(tmp_path / "o.jsonl", [line("good", prompt="héllo wörld"),
                                        line("bad", prompt="status-400")])
    with gateway_before(matrix, {"*": upstream}) as url:
        batch_run(url, path, expect=1)
    raw = (tmp_path / "o.output.jsonl").read_text(encoding="utf-8")
    assert raw.endswith("\n") and raw.count("\n") == 2  # one line per answer, JSON Lines
    answers = {a["custom_id"]: a for a in read(tmp_path / "o.output.jsonl")}
    for answer in answers.values():
        assert list(answer) == ["id", "custom_id", "response", "error"]
        assert ANSWER_ID.fullmatch(answer["id"])
        assert list(answer["response"]) == ["status_code", "request_id", "body"]
        assert isinstance(answer["response"]["request_id"], str)
        assert answer["response"]["request_id"]
        assert answer["error"] is None
    good, bad = answers["good"]["response"], answers["bad"]["response"]
    assert good["status_code"] == 200 and type(good["status_code"]) is int
    chat = ChatCompletion.model_validate(good["body"])
    assert chat.choices[0].message.content.endswith("héllo wörld")
    assert bad["status_code"] == 400
    assert set(bad["body"]["error"]) == {"message", "type", "param", "code"}  # OpenAI's shape
    assert answers["good"]["id"] != answers["bad"]["id"]
    error = batch.error_line("c", "deadline_exceeded", "no answer")
    assert json.loads(error) == {"id": json.loads(error)["id"], "custom_id": "c",
                                 "response": None,
                                 "error": {"code": "deadline_exceeded", "message": "no answer"}}
    assert list(json.loads(error)) == ["id", "custom_id", "response", "error"]


def test_a_body_that_spans_lines_is_re_encoded_on_one_line():
    raw = b'{\n  "id": "cmpl-1",\n  "usage": {"prompt_tokens": 1}\n}'
    text = batch.output_line("c", 200, "r-1", raw, json.loads(raw))
    assert text.count("\n") == 1 and json.loads(text)["response"]["body"] == json.loads(raw)
    same = batch.output_line("c", 200, None, b'{"a": "\\u00e9"}', {"a": "é"})
    assert '"body": {"a": "\\u00e9"}' in same  # one line already: as the endpoint sent it
    assert json.loads(same)["response"]["request_id"].startswith("req_")


# ## Resume: after a real Ctrl-C, and over an output with failures in it


def test_resume_skips_2xx_answers_and_resends_the_rest_without_duplicates(matrix, tmp_path):
    upstream = standin()
    path = write(tmp_path / "r.jsonl", [line(f"r{i}") for i in range(5)])
    output = tmp_path / "r.output.jsonl"
    earlier = [answer_line("r0", 200), answer_line("r1", 400), answer_line("r0", 200),
               answer_line("gone", 201), answer_line("r3", 503)]
    output.write_text("".join(json.dumps(x) + "\n" for x in earlier)
                      + '{"id": "batch_req_cut", "custom_id": "r4", "resp', encoding="utf-8")
    with gateway_before(matrix, {"*": upstream}) as url:
        summary = batch_run(url, path)
    assert sorted(received(upstream)) == [f"question r{i}" for i in (1, 2, 3, 4)]
    answers = read(output)
    assert sorted(a["custom_id"] for a in answers) == ["gone", "r0", "r1", "r2", "r3", "r4"]
    assert answers[:2] == [answer_line("r0", 200), answer_line("gone", 201)]  # kept as they were
    assert all(200 <= a["response"]["status_code"] < 300 for a in answers)
    assert summary["totals"]["requests_ok"] == 4  # this run's
    assert not list(tmp_path.glob(".*.tmp"))
    again = run("--batch", "h100", "--input", str(path), "--base-url", url)
    assert again.exit_code == 0 and "nothing to send" in again.stdout


def _wait_lines(path: Path, n: int, proc: subprocess.Popen) -> bool:
    return wait_until(lambda: proc.poll() is not None or (
        path.exists() and path.read_text().count("\n") >= n), timeout=60)


def test_ctrl_c_keeps_what_was_answered_and_resuming_answers_each_request_once(matrix,
                                                                                tmp_path):
    upstream = standin(delay=0.3)
    path = write(tmp_path / "big.jsonl", [line(f"r{i:02d}") for i in range(24)])
    output = tmp_path / "big.output.jsonl"
    env = {**os.environ, "VLLM_API_KEY": KEY, "COLUMNS": "200"}
    with gateway_before(matrix, {"*": upstream}) as url:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT_DIR / "deploy.py"), "--batch", "h100", "--input",
             str(path), "--base-url", url, "--concurrency", "3"],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert _wait_lines(output, 4, proc) and proc.poll() is None
            proc.send_signal(signal.SIGINT)
            stdout, stderr = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 130, stderr
        first = read(output)
        assert 4 <= len(first) < 24 and len({a["custom_id"] for a in first}) == len(first)
        assert "Interrupted: 0 request(s) still in flight" in stderr  # all finished in grace
        resume = next(x for x in stderr.splitlines() if x.startswith("Resume"))
        command = shlex.split(resume.split(": ", 1)[1])
        assert command[:3] == ["uv", "run", "deploy.py"]
        assert command[3:] == ["--batch", "h100", "--input", str(path), "-o", str(output),
                               "--base-url", url, "--concurrency", "3"]
        assert "total" in stdout  # the summary of what was done
        again = subprocess.run([sys.executable, str(ROOT_DIR / "deploy.py"), *command[3:]],
                               cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=120, check=False)
    assert again.returncode == 0, again.stderr
    answers = read(output)
    assert sorted(a["custom_id"] for a in answers) == [f"r{i:02d}" for i in range(24)]
    assert answers[:len(first)] == first  # the first run's answers, untouched
    assert sorted(received(upstream)) == [f"question r{i:02d}" for i in range(24)]  # once each
    assert len(list((tmp_path / "results").glob("batch-big-*.json"))) == 2


def test_a_second_ctrl_c_stops_waiting_for_requests_in_flight(matrix, tmp_path):
    upstream = standin(delay=60)
    path = write(tmp_path / "slow.jsonl", [line(f"r{i}") for i in range(4)])
    with gateway_before(matrix, {"*": upstream}) as url:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT_DIR / "deploy.py"), "--batch", "h100", "--input",
             str(path), "--base-url", url, "--concurrency", "2"],
            cwd=tmp_path, env={**os.environ, "VLLM_API_KEY": KEY}, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        try:
            assert wait_until(lambda: len(upstream.received) == 2, timeout=60)
            proc.send_signal(signal.SIGINT)
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
            started = time.monotonic()
            _, stderr = proc.communicate(timeout=batch.GRACE + 30)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 130, stderr
        assert time.monotonic() - started < batch.GRACE  # did not sit out the grace period
        assert "Interrupted: 2 request(s) still in flight" in stderr
        assert wait_until(lambda: len(upstream.disconnects) == 2, timeout=10)  # cancelled
    assert (tmp_path / "slow.output.jsonl").read_text() == ""


# ## Cost: replicas counted on Modal (patched at cloud's boundary) x $/hour per replica


def test_a_modal_app_gets_an_estimated_cost_from_the_replicas_seen(matrix, tmp_path,
                                                                    monkeypatch):
    import cloud

    polls = []

    def running_replicas(app, environment):
        polls.append((app.name, environment))
        return {"gemma-3-12b": 2, "gemma-3-27b": 0, "qwen3-vl-30b": None}

    monkeypatch.setattr(batch, "POLL_INTERVAL", 0.2)
    monkeypatch.setattr(cloud, "running_replicas", running_replicas)
    upstream = standin(delay=0.25)
    path = write(tmp_path / "c.jsonl", [line(f"r{i}") for i in range(6)])
    with gateway_before(matrix, {"*": upstream}) as url:
        monkeypatch.setattr(cloud, "endpoint_url", lambda m, key, environment=None: url)
        result = run("--batch", "h100", "--input", str(path), "--concurrency", "2", "--json",
                     "--env", "dev", env={"VLLM_API_KEY": KEY})
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["gpu"] == "h100" and summary["endpoint"] == url
    assert len(polls) >= 3 and set(polls) == {("vllm-h100", "dev")}  # start, during, end
    stats = summary["models"]["gemma-3-12b"]
    price = matrix.fit(matrix.models["gemma-3-12b"], matrix.gpus["h100"]).usd_per_hour
    assert stats["replicas_seen"] == 2
    # Two replicas for (about) the run's wall time: the first count comes as it starts, the
    # last as it ends.
    assert stats["usd_estimate"] == pytest.approx(2 * summary["wall_s"] / 3600 * price,
                                                  rel=0.25)
    assert stats["cost_basis"].startswith("estimate: ")
    assert f"x ${price:.2f}/hour per replica" in stats["cost_basis"]
    assert summary["totals"]["usd_estimate"] == stats["usd_estimate"]
    assert summary["totals"]["replicas_seen"] == 2


def test_a_legacy_app_is_priced_without_the_snapshot_memory_it_does_not_reserve(
        matrix, tmp_path, monkeypatch):
    """`snapshot: true` makes a GPU app's pool reserve the whole weights in host memory; a
    legacy app's container never snapshots, and its estimate must not pay for that memory."""
    import cloud
    import plan

    snapshots = tmp_path / "models.yaml"
    snapshots.write_text(config.DEFAULT_PATH.read_text().replace(
        "    name: google/gemma-3-12b-it ", "    snapshot: true\n    name: google/gemma-3-12b-it ",
        1))
    with_snapshot = config.load(snapshots)
    legacy = plan.legacy_app(with_snapshot, "gemma-3-12b-h100").pools[0]
    pooled = plan.gpu_app(with_snapshot, "h100").pools[0]
    assert pooled.snapshot and not legacy.snapshot
    assert legacy.usd_per_hour < pooled.usd_per_hour  # the weights' host memory
    monkeypatch.setattr(cloud, "running_replicas", lambda app, environment: {"gemma-3-12b": 1})
    path = write(tmp_path / "l.jsonl", [line("r0", None)])
    with gateway_before(matrix, {"*": standin()}, models=("gemma-3-12b",)) as url:
        monkeypatch.setattr(cloud, "endpoint_url", lambda m, key, environment=None: url)
        result = run("--batch", "gemma-3-12b-h100", "--input", str(path), "--json",
                     "--config", str(snapshots), env={"VLLM_API_KEY": KEY})
    assert result.exit_code == 0, result.output
    basis = json.loads(result.stdout)["models"]["gemma-3-12b"]["cost_basis"]
    assert f"x ${legacy.usd_per_hour:.2f}/hour per replica" in basis


def test_a_failed_count_on_modal_leaves_no_estimate_and_says_why(matrix, tmp_path, monkeypatch):
    import cloud

    def unreachable(app, environment):
        raise cloud.ModalUnreachableError("counting the running replicas of vllm-h100: cannot "
                                          "reach Modal (timeout)")

    monkeypatch.setattr(cloud, "running_replicas", unreachable)
    path = write(tmp_path / "c.jsonl", [line("r0")])
    with gateway_before(matrix, {"*": standin()}) as url:
        monkeypatch.setattr(cloud, "endpoint_url", lambda m, key, environment=None: url)
        result = run("--batch", "h100", "--input", str(path), "--json",
                     env={"VLLM_API_KEY": KEY})
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)["models"]["gemma-3-12b"]
    assert stats["usd_estimate"] is None and stats["replicas_seen"] is None
    assert stats["cost_basis"] == ("no estimate: the running replicas could not be counted on "
                                   "Modal: counting the running replicas of vllm-h100: cannot "
                                   "reach Modal (timeout)")


@pytest.mark.parametrize(("points", "expected"), [
    ([(0.0, 1), (30.0, 1)], 30.0),
    ([(0.0, 0), (30.0, 2), (60.0, 2)], 30.0 + 60.0),  # a replica starting: ramps up
    ([(0.0, 1), (10.0, None), (20.0, 3)], 40.0),  # a failed count is skipped
    ([(0.0, 4)], None),  # one count: no duration
])
def test_replica_seconds_are_the_counts_integrated_over_time(points, expected):
    assert batch.replica_seconds(points) == expected


def test_cost_is_replica_seconds_times_the_hourly_price_per_replica():
    samples = batch.Samples([(0.0, {"m": 2}), (1800.0, {"m": 2})])
    seen, usd, basis = batch.cost_estimate("m", samples, 3.95, base_url=False, scaledown_s=900)
    assert (seen, usd) == (2, 3.95)  # 2 replicas x half an hour x $3.95
    assert basis.startswith("estimate: 3600 replica-seconds seen running (2 counts on Modal")
    assert "15-minute scaledown window" in basis


# ## Pieces: the id table, the output paths, the progress bar


def test_the_id_table_finds_duplicates_and_lines_through_growth():
    table = batch.IdTable()
    ids = [f"request-{i}" for i in range(5000)]  # grows from 1024 slots several times
    assert all(table.add(cid, n) == 0 for n, cid in enumerate(ids, 1))
    assert len(table) == 5000 and table.size >= 5000 / 0.7
    assert table.add("request-4321", 9999) == 4322
    assert table.line_of("request-0") == 1 and table.line_of("request-5000") == 0
    assert table.add("", 1) == 0 and table.add("\udcff", 2) == 0  # any str, even lone surrogates


def test_default_paths_are_named_after_the_input(tmp_path):
    source = tmp_path / "evals.jsonl"
    assert batch.output_paths(source, None) == (tmp_path / "evals.output.jsonl",
                                                tmp_path / "evals.errors.jsonl")
    assert batch.output_paths(source, tmp_path / "out" / "answers.jsonl") == (
        tmp_path / "out" / "answers.jsonl", tmp_path / "out" / "answers.errors.jsonl")
    with pytest.raises(config.UsageError, match="the error file .* would overwrite the input"):
        batch.output_paths(tmp_path / "a.errors.jsonl", tmp_path / "a.jsonl")


def test_the_progress_bar_shows_done_failed_in_flight_rates_and_eta(matrix):
    from rich.console import Console

    screen = io.StringIO()
    runs = {0: batch.ModelRun(matrix.models["gemma-3-12b"], to_send=10)}
    view = batch.ProgressView(Console(file=screen, force_terminal=True, width=200), runs, "in")
    view.bar.start()
    time.sleep(0.2)
    runs[0].ok, runs[0].failed, runs[0].in_flight, runs[0].completion_tokens = 3, 1, 2, 300
    view.tick()
    view.bar.stop()
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())
    assert "4/10 done" in shown and "1 failed" in shown and "2 in flight" in shown
    assert re.search(r"[\d.]+ req/s", shown) and re.search(r"\d+ tok/s", shown)
    assert re.search(r"ETA \d\d:\d\d:\d\d", shown)
