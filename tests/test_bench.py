"""`--bench`: the metric arithmetic against hand-worked timings (the definitions of
`vllm bench serve`), cost per million tokens, the ranking of saved runs, and real runs
through the CLI against the gateway in front of stand-in servers on loopback."""

from __future__ import annotations

import asyncio
import json
from contextlib import contextmanager
from pathlib import Path

import pytest
from servers import ThreadServer
from standin import StandIn
from typer.testing import CliRunner

import bench
import deploy
import gateway

KEY = "sk-bench-test-key-0123456789"
approx = pytest.approx


# ## Percentiles: numpy's default (linear interpolation between closest ranks)


@pytest.mark.parametrize(("values", "p", "expected"), [
    ([1, 2, 3, 4], 50, 2.5),  # rank 1.5: halfway between 2 and 3
    ([1, 2, 3, 4], 99, 3.97),  # rank 2.97: 3 + 0.97 x (4 - 3)
    ([4, 1, 3, 2], 25, 1.75),  # unsorted input; rank 0.75
    ([10, 20], 99, 19.9),
    ([5], 99, 5),
    ([3, 1, 2], 0, 1),
    ([3, 1, 2], 100, 3),
    ([], 50, None),
])
def test_percentile_interpolates_like_numpy(values, p, expected):
    assert bench.percentile(values, p) == (None if expected is None else approx(expected))


# ## One request, then a run: hand-worked timings


def test_one_request_ttft_itl_e2el_and_tpot():
    # Sent at t=10.0 s; chunks with choices at 10.5, 10.6, 10.8 and 11.1; usage: 4 tokens.
    r = bench.record_from_timings(10.0, [10.5, 10.6, 10.8, 11.1], output_tokens=4,
                                  prompt_tokens=7)
    assert r.ok and r.ttft == approx(0.5) and r.e2el == approx(1.1)
    assert r.itl == approx((0.1, 0.2, 0.3))
    assert r.tpot == approx(0.2)  # (1.1 - 0.5) / (4 - 1)
    assert r.prompt_tokens == 7
    # No usage report: one token per chunk. One token: no TPOT (as vllm bench serve).
    assert bench.record_from_timings(0.0, [0.2, 0.3]).output_tokens == 2
    assert bench.record_from_timings(0.0, [0.2], output_tokens=1).tpot is None
    # No chunk at all is a failure, as is an error.
    assert not bench.record_from_timings(0.0, []).ok
    assert bench.record_from_timings(0.0, [0.1], error="HTTP 503: x").error == "HTTP 503: x"


def test_a_run_summarized_by_hand():
    records = [
        bench.record_from_timings(10.0, [10.5, 10.6, 10.8, 11.1], output_tokens=4,
                                  prompt_tokens=100),
        bench.record_from_timings(0.0, [0.3, 0.7], output_tokens=2, prompt_tokens=50),
        bench.record_from_timings(0.0, [], error="ReadError after 0 chunk(s)"),
    ]
    m = bench.summarize(records, wall_s=2.0)
    assert (m["completed"], m["failed"], m["errors"]) == (2, 1, ["ReadError after 0 chunk(s)"])
    assert m["duration_s"] == 2.0
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (150, 6)
    assert m["request_throughput"] == approx(1.0)  # 2 completed / 2 s
    assert m["output_throughput"] == approx(3.0)  # 6 tokens / 2 s
    # TTFT 500 and 300 ms; p99 = 300 + 0.99 x 200
    assert m["ttft_ms"] == {"mean": approx(400), "p50": approx(400), "p99": approx(498)}
    # TPOT 200 ms ((1.1 - 0.5) / 3) and 400 ms ((0.7 - 0.3) / 1)
    assert m["tpot_ms"] == {"mean": approx(300), "p50": approx(300), "p99": approx(398)}
    # ITL: every gap of every request: 100, 200, 300, 400 ms; p99 at rank 2.97
    assert m["itl_ms"] == {"mean": approx(250), "p50": approx(250), "p99": approx(397)}
    # E2EL 1100 and 700 ms
    assert m["e2el_ms"] == {"mean": approx(900), "p50": approx(900), "p99": approx(1096)}


def test_a_run_without_success_has_no_latencies():
    m = bench.summarize([bench.record_from_timings(0.0, [], error="x")], wall_s=1.0)
    assert m["completed"] == 0 and m["output_throughput"] == 0
    assert m["ttft_ms"] == {"mean": None, "p50": None, "p99": None}


def test_dollars_per_million_output_tokens():
    # One H100 at $3.95/h making 1000 tokens/s: 3.6M tokens an hour.
    assert bench.usd_per_million_tokens(3.95, 1000) == approx(3.95 / 3.6)
    # gemma-3-27b on two L40S ($1.95/h each) at 500 tokens/s: 1.8M tokens for $3.90.
    assert bench.usd_per_million_tokens(2 * 1.95, 500) == approx(3.90 / 1.8)
    assert bench.usd_per_million_tokens(3.95, 0) is None


@pytest.mark.parametrize(("concurrency", "replicas"), [(1, 1), (32, 1), (33, 2), (64, 2),
                                                     (500, 4)])
def test_the_cost_counts_the_replicas_the_load_needs(matrix, concurrency, replicas):
    """Each replica takes max_concurrent_inputs (32) at once; Modal starts more for more, up to
    max_replicas (4), and each is billed."""
    import checks
    import plan

    target = checks.resolve_target(matrix, plan.gpu_app(matrix, "l40s"), test_model="gemma-3-27b",
                                   base_url="http://x", api_key=None, deadline_s=None)
    settings = bench.Settings(concurrency=concurrency)
    metrics = {"output_throughput": 1000.0}
    result = bench.build_result(target, matrix.models["gemma-3-27b"], settings, metrics, 0.0, "")
    # gemma-3-27b needs two L40S per replica ($3.90/h), and the replica reserves 5 cores
    # (5 x $0.04716 = $0.2358/h) and 20 GiB (20 x $0.007992 = $0.15984/h): $4.29564/h in all.
    assert (result["replicas"], result["gpus_per_replica"], result["usd_per_hour"]) == (
        replicas, 2, 4.2956)
    assert result["usd_per_hour_split"] == {"gpu": 3.9, "cpu": 0.2358, "memory": 0.1598}
    # 1000 tokens/s is 3.6M tokens an hour, per replica's hour.
    assert result["usd_per_million_output_tokens"] == approx(
        round(replicas * 4.29564 / 3.6, 4))


def test_prompts_have_the_asked_length_and_differ_per_request():
    assert len(bench.make_prompt(1024, 0).split()) == 1024
    assert bench.make_prompt(32, 0) != bench.make_prompt(32, 1)
    assert bench.make_prompt(32, 5) == bench.make_prompt(32, 5)


# ## Ranking saved runs


def saved_run(gpu, cost, *, ttft_p99=100.0, tpot_p99=20.0, failed=0, started="2026-01-01T00:00",
              settings=None):
    return {"kind": bench.RESULT_KIND, "model": "gemma-3-12b", "gpu": gpu, "gpu_string": gpu,
            "started_at": started, "settings": settings or vars(bench.Settings()).copy(),
            "usd_per_million_output_tokens": cost,
            "metrics": {"failed": failed, "output_throughput": 1000.0,
                        "ttft_ms": {"p99": ttft_p99}, "tpot_ms": {"p99": tpot_p99}}}


RUNS = [saved_run("l40s", 2.17, ttft_p99=900), saved_run("h100", 1.10, ttft_p99=300),
        saved_run("b200", 1.50, ttft_p99=100), saved_run("a100", 0.90, failed=2)]


def test_runs_saved_before_cpu_and_memory_were_counted_are_marked():
    # Such a run's $ per million tokens priced the GPUs only: ~7 % low against a new one.
    old = saved_run("h100", 1.10)
    new = {**saved_run("a100", 0.90), "usd_per_hour_split": {"gpu": 2.5, "cpu": 0.19,
                                                              "memory": 0.11}}
    rows = bench.rank([old, new])
    assert [(r["gpu"], r["gpu_only_cost"]) for r in rows] == [("a100", False), ("h100", True)]


def test_runs_rank_by_cost_and_failed_runs_never_win():
    rows = bench.rank(RUNS)
    assert [r["gpu"] for r in rows] == ["h100", "b200", "l40s", "a100"]
    assert rows[-1]["misses"] == ["2 failed"]
    assert bench.cheapest(rows)["gpu"] == "h100"


def test_targets_put_the_runs_that_miss_them_last():
    rows = bench.rank(RUNS, max_ttft_ms=200)
    assert [r["gpu"] for r in rows] == ["b200", "a100", "h100", "l40s"]  # misses: by cost too
    assert rows[2]["misses"] == ["TTFT p99 300 ms > 200 ms"]
    assert bench.cheapest(rows)["gpu"] == "b200"
    rows = bench.rank(RUNS, max_ttft_ms=1000, max_tpot_ms=10)
    assert bench.cheapest(rows) is None
    assert rows[0]["misses"] == ["2 failed", "TPOT p99 20 ms > 10 ms"]  # a100, the cheapest
    assert rows[1]["misses"] == ["TPOT p99 20 ms > 10 ms"]


def test_only_the_latest_run_per_gpu_under_the_same_load_compares(tmp_path):
    other_load = {**vars(bench.Settings()), "concurrency": 1}
    runs = [saved_run("h100", 1.0, started="2026-01-01T00:00"),
            saved_run("h100", 2.0, started="2026-02-01T00:00"),
            saved_run("l40s", 0.5, settings=other_load)]
    for n, run in enumerate(runs):
        (tmp_path / f"{n}.json").write_text(json.dumps(run))
    (tmp_path / "notes.json").write_text("[1, 2]")
    (tmp_path / "broken.json").write_text("{")
    loaded = bench.load_results(tmp_path, "gemma-3-12b")
    assert len(loaded) == 3 and bench.load_results(tmp_path, "gemma-3-27b") == []
    (latest,) = bench.latest_per_gpu(loaded, bench.Settings())
    assert latest["usd_per_million_output_tokens"] == 2.0


def test_incomplete_saved_runs_are_skipped_not_a_crash(tmp_path):
    (tmp_path / "ok.json").write_text(json.dumps(saved_run("h100", 1.0)))
    (tmp_path / "edited.json").write_text(json.dumps(
        {"kind": bench.RESULT_KIND, "model": "gemma-3-12b", "gpu": "l40s"}))
    loaded = bench.load_results(tmp_path, "gemma-3-12b")
    assert [r["gpu"] for r in loaded] == ["h100"]
    assert [r["gpu"] for r in bench.rank(bench.latest_per_gpu(loaded, bench.Settings()))] == [
        "h100"]


class Streamer:
    """An ASGI app that answers every request with the same raw event-stream body."""

    def __init__(self, body: bytes):
        self.body = body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": self.body})


@pytest.mark.parametrize(("body", "error"), [
    (b"data: [1, 2]\n\ndata: [DONE]\n\n", "a chunk is not a JSON object"),
    (b'data: "text"\n\ndata: [DONE]\n\n', "a chunk is not a JSON object"),
    (b"data: {oops\n\n", "a chunk is not JSON"),
    (b'data: {"choices": [{"text": "a"}]}\n\n', "the stream ended without [DONE]"),
    (b'data: {"error": {"message": "x"}}\n\n', "the stream broke off with an error event"),
])
def test_a_malformed_stream_is_a_failed_request_not_a_crash(matrix, body, error):
    import checks

    async def one(url):
        async with checks.Endpoint(url, KEY, deadline_s=5) as endpoint:
            return await bench.timed_request(endpoint, matrix.models["gemma-3-12b"], "hi", 4)

    with ThreadServer(Streamer(body)) as server:
        record = asyncio.run(one(server.url))
    assert (record.ok, record.error) == (False, error)


# ## Real runs through the CLI


@contextmanager
def gateway_before(matrix, upstream: StandIn):
    with ThreadServer(upstream) as up:
        model = matrix.models["gemma-3-12b"]
        backend = gateway.HTTPBackend({model.key: up.url})
        with ThreadServer(gateway.build_app([model], backend, api_key=KEY)) as gw:
            yield gw.url


def run_bench(url, results, *args):
    return CliRunner().invoke(deploy.cli, [
        "--bench", "h100", "--test-model", "gemma-3-12b", "--base-url", url, "--api-key", KEY,
        "--requests", "8", "--concurrency", "4", "--input-len", "16", "--output-len", "6",
        "--results-dir", str(results), *args], env={"COLUMNS": "200"})


def test_a_streaming_run_is_measured_saved_and_ranked(matrix, tmp_path):
    upstream = StandIn(["google/gemma-3-12b-it"], token_delay=0.01)
    with gateway_before(matrix, upstream) as url:
        result = run_bench(url, tmp_path, "--json")
        assert result.exit_code == 0, result.output
        out = json.loads(result.stdout)
        sent = [x["body"] for x in upstream.received if x["path"] == "/v1/completions"]
        # A cheaper (made-up) run on L40S under the same load, then a second run in table form.
        cheaper = {**out["result"], "gpu": "l40s", "usd_per_million_output_tokens": 0.01}
        (tmp_path / "l40s.json").write_text(json.dumps(cheaper))
        older = {k: v for k, v in out["result"].items() if k != "usd_per_hour_split"}
        (tmp_path / "b200.json").write_text(json.dumps({**older, "gpu": "b200"}))
        table = run_bench(url, tmp_path, "--max-ttft-ms", "60000")
    r = out["result"]
    m = r["metrics"]
    assert (m["completed"], m["failed"], m["total_output_tokens"]) == (8, 0, 48)
    load = [b for b in sent if b.get("stream")]
    assert len(load) == 8 and all(b["max_tokens"] == 6 and b["ignore_eos"] is True and
                                  len(b["prompt"].split()) == 16 and
                                  b["stream_options"] == {"include_usage": True} for b in load)
    assert len({b["prompt"] for b in load}) == 8
    # The stand-in waits 10 ms after each of its 6 chunks: no request can end sooner than 50 ms
    # after it was sent. (Gaps seen by the client can be shorter: a busy machine reads chunks
    # together.) With 6 tokens in 6 chunks per request, mean TPOT and mean ITL are both
    # (mean E2EL - mean TTFT) / 5.
    assert m["e2el_ms"]["p50"] >= 5 * 9.5 and m["ttft_ms"]["p50"] < m["e2el_ms"]["p50"]
    per_token = (m["e2el_ms"]["mean"] - m["ttft_ms"]["mean"]) / 5
    assert m["tpot_ms"]["mean"] == approx(per_token, abs=0.01)
    assert m["itl_ms"]["mean"] == approx(per_token, abs=0.01)
    assert m["output_throughput"] == approx(48 / m["duration_s"], rel=1e-3)
    # One H100 ($3.95/h) + 4 cores ($0.18864/h) + 14 GiB ($0.111888/h) = $4.250528/h.
    assert r["usd_per_hour"] == 4.2505 and r["gpus_per_replica"] == 1 and r["gpu"] == "h100"
    assert r["usd_per_hour_split"] == {"gpu": 3.95, "cpu": 0.1886, "memory": 0.1119}
    assert r["replicas"] == 1  # 4 requests in flight, 32 per replica
    assert r["usd_per_million_output_tokens"] == approx(
        4.250528 / (m["output_throughput"] * 3600) * 1e6, rel=1e-3)
    assert r["cost_assumption"].startswith(
        "1 replica(s) for 4 requests in flight (32 per replica, at most 4), each busy for the "
        "run's wall time")
    saved = json.loads(Path(out["saved"]).read_text())
    assert saved == r and out["saved"].startswith(str(tmp_path / "gemma-3-12b-h100-"))
    assert out["cheapest"] == "h100" and [row["gpu"] for row in out["comparison"]] == ["h100"]
    assert table.exit_code == 0, table.output
    text = " ".join(table.stdout.split())
    assert "Requests 8 completed, 0 failed" in text
    assert ("per million output tokens at $4.25/h per replica ($3.95 GPU + $0.19 CPU + $0.11 "
            "memory; 1x h100) x 1 (assumes 1 replica(s)") in text
    assert "Cheapest meeting the targets: l40s at $0.01 per million output tokens." in text
    assert "(GPU only: an older run)" in text  # the b200 run saved without the split
    assert KEY not in table.output
    assert len(list(tmp_path.glob("gemma-3-12b-h100-*.json"))) == 2


def test_requests_broken_off_mid_stream_count_as_failed(matrix, tmp_path):
    with gateway_before(matrix, StandIn(["google/gemma-3-12b-it"], break_after=3)) as url:
        result = run_bench(url, tmp_path, "--json", "--requests", "4")
    assert result.exit_code == 1, result.output
    out = json.loads(result.stdout)
    assert (out["result"]["metrics"]["completed"], out["result"]["metrics"]["failed"]) == (0, 4)
    assert out["result"]["metrics"]["errors"] == ["the stream broke off with an error event"]
    assert out["cheapest"] is None and out["comparison"][0]["misses"] == ["4 failed"]
