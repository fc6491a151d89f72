"""Saved runs for the results page's tests, made by the real `bench.summarize`,
`bench.build_result` and `bench.save_result` from hand-chosen timings, so the page reads the
format `--bench` writes, and the figures below can be worked out by hand.

Every request of a run takes the same time, so p99 TTFT is the run's TTFT and p99 TPOT its
gap between tokens; 8 successful requests of 128 tokens make 1024 output tokens, so output tokens/s is
1024 / wall, and $ per million output tokens = $/hour / (tokens/s x 3600) x 1e6 (one replica:
16 in flight, 32 per replica):

| gpu  | started    | TTFT p99 | TPOT p99 | wall  | tok/s  | $/h    | $ / M out | note                  |
|------|------------|----------|----------|-------|--------|--------|-----------|-----------------------|
| a100 | 2026-11-12 | 500 ms   | 20 ms    | 1.0 s | 1024   | 2.8005 | 0.7597    | 2 more failed         |
| h200 | 2026-06-01 | 200 ms   | 12 ms    | 0.8 s | 1280   | 4.54   | 0.9852    | oldest: GPU-only price |
| b200 | 2026-11-15 | 120 ms   | 10 ms    | 0.6 s | 1706.7 | 6.5505 | 1.0662    | GPU not reported      |
| h100 | 2026-11-20 | 300 ms   | 15 ms    | 1.0 s | 1024   | 4.2505 | 1.1530    | newest: targets below |
| l40s | 2026-11-10 | 900 ms   | 40 ms    | 2.0 s | 512    | 2.2505 | 1.2210    |                       |
| h100 | 2026-11-01 | 350 ms   | 18 ms    | 1.6 s | 640    | 4.2505 | 1.8448    | superseded            |

$/h is models.yaml's whole bill for one gemma-3-12b replica: the GPU's price plus 4 CPU cores
($0.1886) and 14 GiB of memory ($0.1119); the oldest run was saved when only GPUs were priced. The newest run (h100) was ranked against TTFT p99
<= 250 ms and TPOT p99 <= 30 ms: a100 failed requests, h100 and l40s miss TTFT, so the
cheapest that meets them is h200 ($0.99), then b200. Under another load (1 in flight) one
h100 run failed every request: nothing to draw, so it is listed instead.

The batch runs are priced by batch.cost_estimate from replica counts: 2 gemma-3-12b and 1
qwen3-vl-30b replicas at the start and the end of a 240 s run on h100 ($4.2505/h each):
480 replica-seconds, $0.5667, and 240, $0.2834.
"""

from __future__ import annotations

import json
from pathlib import Path

import batch
import bench
import checks
import plan

MODEL = "gemma-3-12b"
LOAD = bench.Settings()  # 16 in flight, 128 requests, 1024 words in, 128 tokens out
TARGETS = {"max_ttft_ms": 250.0, "max_tpot_ms": 30.0}
# gpu -> (started, TTFT s, gap s, wall s, failed requests)
RUNS = {
    "a100": ("2026-11-12T09:00:00.000+00:00", 0.5, 0.020, 1.0, 2),
    "h200": ("2026-06-01T09:00:00.000+00:00", 0.2, 0.012, 0.8, 0),
    "b200": ("2026-11-15T09:00:00.000+00:00", 0.12, 0.010, 0.6, 0),
    "l40s": ("2026-11-10T09:00:00.000+00:00", 0.9, 0.040, 2.0, 0),
    "h100": ("2026-11-20T09:00:00.000+00:00", 0.3, 0.015, 1.0, 0),
}
EARLIER_H100 = ("2026-11-01T09:00:00.000+00:00", 0.35, 0.018, 1.6, 0)
COST = {"a100": 0.7597, "h200": 0.9852, "b200": 1.0662, "h100": 1.153, "l40s": 1.221}
CHEAPEST = "h200"
GPU_ACTUAL_H100 = {"name": "NVIDIA H200", "count": 1, "driver": "580.95.05", "vllm": "0.33.0"}


def metrics(ttft: float, gap: float, wall: float, failed: int, *, ok: int = 8) -> dict:
    """bench.summarize over `ok` identical requests of 128 tokens, and `failed` failures."""
    records = [bench.record_from_timings(0.0, [ttft + i * gap for i in range(128)],
                                         output_tokens=128, prompt_tokens=1024)
               for _ in range(ok)]
    records += [bench.record_from_timings(0.0, [], error="HTTP 503: the server is starting")
                for _ in range(failed)]
    return bench.summarize(records, wall)


def save_run(matrix, results_dir: Path, gpu: str, started: str, ttft: float, gap: float,
             wall: float, failed: int, *, ok: int = 8, settings: bench.Settings = LOAD,
             targets=None, extra: dict | None = None, drop: tuple[str, ...] = ()) -> Path:
    target = checks.resolve_target(matrix, plan.gpu_app(matrix, gpu), test_model=MODEL,
                                   base_url=f"https://ws--vllm-{gpu}-serve.modal.run",
                                   api_key=None, deadline_s=None)
    result = bench.build_result(target, matrix.models[MODEL], settings,
                                metrics(ttft, gap, wall, failed, ok=ok), 42.0, started)
    if targets is not None:
        result["targets"] = targets
    result.update(extra or {})
    for key in drop:
        result.pop(key)
    return bench.save_result(result, results_dir)


def batch_run(matrix, started: str, *, failed: int, gpu: str | None) -> dict:
    """A saved --batch summary as batch.summarize writes it, the cost by batch.cost_estimate."""
    samples = batch.Samples([(0.0, {"gemma-3-12b": 2, "qwen3-vl-30b": 1}),
                             (240.0, {"gemma-3-12b": 2, "qwen3-vl-30b": 1})])
    app = plan.gpu_app(matrix, "h100")
    price = {p.model.key: p.fit.usd_per_hour for p in app.pools}

    def cost(key):
        return batch.cost_estimate(key, samples, price[key], base_url=gpu is None,
                                   scaledown_s=matrix.defaults.scaledown_window_seconds)

    models = {}
    for key, ok, prompt, completion, wall in (("gemma-3-12b", 900, 450000, 180000, 240.0),
                                              ("qwen3-vl-30b", 1000, 500000, 96000, 200.0)):
        seen, usd, basis = cost(key)
        models[key] = {"requests_ok": ok, "requests_failed": failed if key == MODEL else 0,
                       "prompt_tokens": prompt, "completion_tokens": completion, "wall_s": wall,
                       "requests_per_s": ok / wall, "output_tokens_per_s": completion / wall,
                       "replicas_seen": seen, "usd_estimate": usd, "cost_basis": basis}
    usds = [m["usd_estimate"] for m in models.values() if m["usd_estimate"] is not None]
    return {"kind": "modal-vllm-batch", "version": 1, "app": "vllm-h100",
            "gpu": gpu, "endpoint": "https://ws--vllm-h100-serve.modal.run",
            "input": "evals/prompts.jsonl", "output": "evals/prompts.output.jsonl",
            "errors": "evals/prompts.errors.jsonl", "started_at": started, "wall_s": 240.0,
            "cost_is_estimate": True, "models": models,
            "totals": {"requests_ok": 1900, "requests_failed": failed,
                       "prompt_tokens": 950000, "completion_tokens": 276000, "wall_s": 240.0,
                       "requests_per_s": 7.917, "output_tokens_per_s": 1150.0,
                       "replicas_seen": 3 if usds else None,
                       "usd_estimate": round(sum(usds), 6) if usds else None,
                       "cost_basis": "the sum of the models' estimates" if usds
                       else models[MODEL]["cost_basis"]}}


def write_runs(matrix, results_dir: Path) -> Path:
    """The runs of the table above, two batch runs, and files the page must list or ignore."""
    results_dir.mkdir(parents=True, exist_ok=True)
    for gpu, run in RUNS.items():
        extra, drop, targets = {}, (), {"max_ttft_ms": 5000.0, "max_tpot_ms": None}
        if gpu == "h100":  # the newest: the fields other engineers add this session
            targets = TARGETS
            extra = {"gpu_actual": GPU_ACTUAL_H100,
                     "hop_ms": {"mean": 41.5, "p50": 38.2, "p99": 95.0}}
        elif gpu == "b200":
            extra = {"gpu_actual": None, "hop_ms": None}
        elif gpu == "h200":  # the first format: no replicas, targets, actual GPU, hop, split;
            # priced by the GPU alone, as runs were before CPU and memory were priced
            targets, drop = None, ("replicas", "usd_per_hour_split")
            extra = {"cost_assumption": "one replica busy for the run's wall time",
                     "usd_per_hour": 4.54, "usd_per_million_output_tokens": 0.9852}
        save_run(matrix, results_dir, gpu, *run, targets=targets, extra=extra, drop=drop)
    save_run(matrix, results_dir, "h100", *EARLIER_H100, targets=TARGETS)
    save_run(matrix, results_dir, "h100", "2026-11-21T09:00:00.000+00:00", 0.3, 0.015, 1.0, 4,
             ok=0, settings=bench.Settings(concurrency=1, requests=4), targets=TARGETS)
    for name, started, failed, gpu in (("batch-prompts-20261118T090000.json",
                                        "2026-11-18T09:00:00.000+00:00", 0, "h100"),
                                       ("batch-prompts-20261119T090000.json",
                                        "2026-11-19T09:00:00.000+00:00", 12, None)):
        run = batch_run(matrix, started, failed=failed, gpu=gpu)
        (results_dir / name).write_text(json.dumps(run))
    (results_dir / "notes.json").write_text("[1, 2]")  # not ours: ignored
    (results_dir / "gemma-3-12b-l40s-broken.json").write_text('{"kind": "modal-vllm-bench"')
    (results_dir / "gemma-3-12b-l40s-edited.json").write_text(json.dumps(
        {"kind": bench.RESULT_KIND, "model": MODEL, "gpu": "l40s"}))
    return results_dir
