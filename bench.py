"""Which GPU serves a model fastest and cheapest? Streaming load, metrics, cost, ranking (`--bench`).

The metrics are defined as `vllm bench serve` defines them (vllm/benchmarks/serve.py),
so the numbers read the same way:
  TTFT  time to first token: send -> first streamed chunk that has choices
  ITL   inter-token latency: the gaps between successive chunks that have choices
  TPOT  time per output token: (E2EL - TTFT) / (output tokens - 1), for requests with > 1 token
  E2EL  end-to-end latency: send -> the last chunk that has choices
  request throughput = completed requests / wall time; output throughput = output tokens /
  wall time, where wall time runs from the first request sent to the last one finished.
Percentiles interpolate linearly between closest ranks, as numpy's default does.

Cost per million output tokens = replica $/hour x replicas / (output tokens/s x 3600) x 1e6,
where a replica's $/hour is its GPUs plus the CPU and memory it reserves (config.Bill: Modal
bills all three) and replicas = the requests in flight / max_concurrent_inputs rounded up (at
most max_replicas): what Modal runs for that load, each busy for the run's wall time; cold
starts, idle time and the GPU app's CPU router (shared by its models) are not in it.
Every run is saved as JSON under a results folder; the comparison ranks the latest
run on each GPU (same model, same load settings) by that cost.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import config
import pool_state

DEFAULT_RESULTS_DIR = Path("results")
RESULT_KIND = "modal-vllm-bench"
# Prompts are words drawn from this list, a different draw per request so that vLLM's
# prefix cache cannot answer them; each common word is about one token for these tokenizers.
VOCABULARY = (
    "time", "year", "people", "way", "day", "man", "thing", "woman", "life", "child", "world",
    "school", "state", "family", "student", "group", "country", "problem", "hand", "part",
    "place", "case", "week", "company", "system", "program", "question", "work", "government",
    "number", "night", "point", "home", "water", "room", "mother", "area", "money", "story",
    "fact", "month", "lot", "right", "study", "book", "eye", "job", "word", "business",
    "issue", "side", "kind", "head", "house", "service", "friend", "father", "power", "hour",
    "game", "line", "end", "member", "law", "car", "city", "name", "president", "team",
    "minute", "idea", "kid", "body", "information", "back", "parent", "face", "others",
    "level", "office", "door", "health", "person", "art", "war", "history", "party", "result",
    "change", "morning", "reason", "research", "girl", "guy", "moment", "air", "teacher",
    "force", "education",
)


@dataclass(frozen=True)
class Settings:
    concurrency: int = 16  # requests in flight at once
    requests: int = 128  # requests in the run
    input_len: int = 1024  # prompt length in words (about as many tokens)
    output_len: int = 128  # tokens generated per request (ignore_eos: exactly this many)

    def check(self) -> Settings:
        for name, value in asdict(self).items():
            if value < 1:
                raise config.UsageError(f"--{name.replace('_', '-')} must be at least 1")
        return self


# ## Metric arithmetic: pure functions over timings (seconds from time.perf_counter)


def percentile(values: Sequence[float], p: float) -> float | None:
    """numpy.percentile(values, p) with its default linear interpolation; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class RequestRecord:
    ok: bool
    ttft: float = 0.0
    e2el: float = 0.0
    itl: tuple[float, ...] = ()
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str = ""
    # From the endpoint's Server-Timing (GPU apps only): the router-to-pool hop (the pool's
    # time less vLLM's) and vLLM's own time to its first byte, in seconds; and its GPU header.
    hop: float | None = None
    engine: float | None = None
    gpu: str | None = None

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.output_tokens <= 1:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)


def record_from_timings(sent: float, chunk_times: Sequence[float], *,
                        output_tokens: int | None = None, prompt_tokens: int = 0,
                        error: str = "", timings: dict | None = None,
                        gpu: str | None = None) -> RequestRecord:
    """One streamed request: when it was sent and when each chunk with choices arrived.

    Output tokens come from the server's usage report; without one, one per chunk.
    `timings`: its Server-Timing entries in ms (pool_state.parse_server_timing).
    """
    if error or not chunk_times:
        return RequestRecord(False, error=error or "no chunk with choices arrived")
    itl = tuple(b - a for a, b in itertools.pairwise(chunk_times))
    tokens = output_tokens if output_tokens is not None else len(chunk_times)
    timings = timings or {}
    pool, engine = timings.get("pool"), timings.get("engine")
    hop = (pool - engine) / 1000 if pool is not None and engine is not None else None
    return RequestRecord(True, chunk_times[0] - sent, chunk_times[-1] - sent, itl, tokens,
                         prompt_tokens, hop=hop, engine=None if engine is None else engine / 1000,
                         gpu=gpu)


def _stats_ms(values: Sequence[float]) -> dict[str, float | None]:
    def ms(v):
        return None if v is None else round(v * 1000, 3)

    mean = sum(values) / len(values) if values else None
    return {"mean": ms(mean), "p50": ms(percentile(values, 50)),
            "p99": ms(percentile(values, 99))}


def summarize(records: Sequence[RequestRecord], wall_s: float) -> dict:
    """The run's metrics, as `vllm bench serve` computes them, over its successful requests."""
    done = [r for r in records if r.ok]
    output = sum(r.output_tokens for r in done)
    errors = sorted({r.error for r in records if not r.ok})
    return {
        "completed": len(done),
        "failed": len(records) - len(done),
        "errors": errors[:5],
        "duration_s": round(wall_s, 6),
        "total_input_tokens": sum(r.prompt_tokens for r in done),
        "total_output_tokens": output,
        "request_throughput": round(len(done) / wall_s, 4) if wall_s > 0 else None,
        "output_throughput": round(output / wall_s, 3) if wall_s > 0 else None,
        "ttft_ms": _stats_ms([r.ttft for r in done]),
        "tpot_ms": _stats_ms([t for r in done if (t := r.tpot) is not None]),
        "itl_ms": _stats_ms([gap for r in done for gap in r.itl]),
        "e2el_ms": _stats_ms([r.e2el for r in done]),
    }


def usd_per_million_tokens(usd_per_hour: float, tokens_per_s: float | None) -> float | None:
    """Dollars per million output tokens for a replica costing `usd_per_hour` while busy."""
    if not tokens_per_s:
        return None
    return usd_per_hour / (tokens_per_s * 3600) * 1e6


# ## Comparison: every saved run of a model, best GPU first


SAVED_KEYS = {"gpu", "started_at", "settings", "metrics", "usd_per_million_output_tokens"}


def load_results(results_dir: Path, model_key: str) -> list[dict]:
    """Every readable saved run of this model (others, and files that are not ours or lack
    what the ranking reads, skipped)."""
    found = []
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("kind") == RESULT_KIND and \
                data.get("model") == model_key and SAVED_KEYS <= data.keys():
            found.append({**data, "file": str(path)})
    return found


def latest_per_gpu(results: list[dict], settings: Settings) -> list[dict]:
    """The newest run on each GPU under the same load: other loads do not compare."""
    latest: dict[str, dict] = {}
    for r in results:
        if r.get("settings") != asdict(settings):
            continue
        if r["gpu"] not in latest or r["started_at"] > latest[r["gpu"]]["started_at"]:
            latest[r["gpu"]] = r
    return list(latest.values())


def rank(results: list[dict], *, max_ttft_ms: float | None = None,
         max_tpot_ms: float | None = None) -> list[dict]:
    """Runs that met the targets (p99 TTFT / TPOT, no failed request) by cost, then the rest."""
    rows = []
    for r in results:
        m = r["metrics"]
        ttft, tpot = m["ttft_ms"]["p99"], m["tpot_ms"]["p99"]
        misses = []
        if m["failed"]:
            misses.append(f"{m['failed']} failed")
        for label, value, limit in (("TTFT", ttft, max_ttft_ms), ("TPOT", tpot, max_tpot_ms)):
            if limit is not None and (value is None or value > limit):
                shown = "-" if value is None else f"{value:.0f}"
                misses.append(f"{label} p99 {shown} ms > {limit:g} ms")
        rows.append({"gpu": r["gpu"], "gpu_string": r.get("gpu_string", r["gpu"]),
                     "usd_per_million_output_tokens": r["usd_per_million_output_tokens"],
                     # runs saved before CPU and memory were counted priced the GPUs only
                     "gpu_only_cost": "usd_per_hour_split" not in r,
                     "output_throughput": m["output_throughput"], "ttft_p99_ms": ttft,
                     "tpot_p99_ms": tpot, "meets_targets": not misses, "misses": misses,
                     "started_at": r["started_at"], "file": r.get("file")})
    rows.sort(key=lambda row: (not row["meets_targets"],
                               row["usd_per_million_output_tokens"] is None,
                               row["usd_per_million_output_tokens"] or 0.0))
    return rows


def cheapest(rows: list[dict]) -> dict | None:
    return next((row for row in rows if row["meets_targets"]
                 and row["usd_per_million_output_tokens"] is not None), None)


# ## The load generator


def make_prompt(words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(VOCABULARY) for _ in range(words))


async def timed_request(endpoint, model: config.Model, prompt: str,
                        output_len: int) -> RequestRecord:
    """One streamed text completion, timed chunk by chunk (no retries: this is the load)."""
    import httpx

    from checks import error_message

    body = {"model": model.name, "prompt": prompt, "max_tokens": output_len,
            "ignore_eos": True,  # vLLM: generate exactly max_tokens, as vllm bench does
            "stream": True, "stream_options": {"include_usage": True}}
    chunk_times: list[float] = []
    usage: dict = {}
    sent = time.perf_counter()
    try:
        async with endpoint.client.stream("POST", "/v1/completions", json=body,
                                          headers=endpoint.headers()) as resp:
            if resp.status_code != 200:
                await resp.aread()
                return record_from_timings(sent, [], error=f"HTTP {resp.status_code}: "
                                                             f"{error_message(resp)}")
            timing_values = resp.headers.get_list("server-timing")
            gpu = resp.headers.get(pool_state.GPU_HEADER.decode())
            async for line in resp.aiter_lines():
                if line.startswith(": "):  # headers that came after the status line
                    name, _, value = line[2:].partition(": ")
                    if name == "server-timing":
                        timing_values.append(value)
                    elif name == pool_state.GPU_HEADER.decode():
                        gpu = value
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if not isinstance(event, dict):
                    return record_from_timings(sent, [], error="a chunk is not a JSON object")
                if event.get("choices"):
                    chunk_times.append(time.perf_counter())
                elif event.get("usage"):
                    usage = event["usage"]
                elif "error" in event:
                    return record_from_timings(sent, [], error="the stream broke off with an "
                                                                "error event")
            else:
                return record_from_timings(sent, [], error="the stream ended without [DONE]")
    except httpx.HTTPError as exc:
        return record_from_timings(sent, [], error=f"{type(exc).__name__} after "
                                                   f"{len(chunk_times)} chunk(s)")
    except ValueError:
        return record_from_timings(sent, [], error="a chunk is not JSON")
    return record_from_timings(sent, chunk_times, output_tokens=usage.get("completion_tokens"),
                               prompt_tokens=usage.get("prompt_tokens") or 0,
                               timings=pool_state.parse_server_timing(timing_values), gpu=gpu)


async def run_load(endpoint, model: config.Model, settings: Settings,
                   on_done=None) -> tuple[list[RequestRecord], float]:
    """`settings.requests` requests, `settings.concurrency` at a time; records and wall time."""
    prompts = [make_prompt(settings.input_len, seed) for seed in range(settings.requests)]
    records: list[RequestRecord | None] = [None] * settings.requests
    pending = iter(range(settings.requests))  # shared by the workers: each takes the next

    async def worker() -> None:
        for i in pending:
            records[i] = await timed_request(endpoint, model, prompts[i], settings.output_len)
            if on_done is not None:
                on_done(records[i])

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(settings.concurrency, settings.requests))))
    return records, time.perf_counter() - start


# ## `--bench`: wake, load, save, compare, print


def replicas_for(concurrency: int, defaults: config.Defaults) -> int:
    """Replicas Modal runs for this many requests in flight: each takes max_concurrent_inputs."""
    return min(defaults.max_replicas, math.ceil(concurrency / defaults.max_concurrent_inputs))


def cost_assumption(replicas: int, settings: Settings, defaults: config.Defaults) -> str:
    return (f"{replicas} replica(s) for {settings.concurrency} requests in flight "
            f"({defaults.max_concurrent_inputs} per replica, at most {defaults.max_replicas}), "
            "each busy for the run's wall time at its GPUs' $/hour plus the CPU and memory it "
            "reserves; cold starts, idle time, the scaledown tail and the CPU router are not "
            "included")


def build_result(target, model: config.Model, settings: Settings, metrics: dict,
                 cold_start_s: float, started_at: str) -> dict:
    pool = next(p for p in target.app.pools if p.model == model)
    bill = pool.bill  # one replica: its GPUs, and the CPU and memory it reserves
    usd_per_hour = bill.usd_per_hour
    replicas = replicas_for(settings.concurrency, target.defaults)
    cost = usd_per_million_tokens(usd_per_hour * replicas, metrics["output_throughput"])
    return {
        "kind": RESULT_KIND, "version": 1, "model": model.key, "model_name": model.name,
        "gpu": target.app.gpu.key, "gpu_string": pool.fit.gpu_string,
        "gpus_per_replica": pool.fit.count, "app": target.app.name,
        "endpoint": target.base_url, "started_at": started_at, "settings": asdict(settings),
        "cold_start_s": round(cold_start_s, 3), "metrics": metrics,
        "usd_per_hour": round(usd_per_hour, 4),  # per replica: GPU + CPU + memory
        "usd_per_hour_split": {k: round(v, 4) for k, v in bill.split().items()},
        "replicas": replicas,
        "usd_per_million_output_tokens": None if cost is None else round(cost, 4),
        "cost_assumption": cost_assumption(replicas, settings, target.defaults),
    }


def what_the_endpoint_reported(records: Sequence[RequestRecord], pool) -> dict:
    """The hop and vLLM's time to first byte (null when the endpoint sends no Server-Timing,
    e.g. --base-url in front of plain vLLM), the GPU it ran on, and a warning when that is not
    the GPU of the key (Modal may run "H100" on an H200: "H100!" in models.yaml pins it)."""
    done = [r for r in records if r.ok]
    hops = [r.hop for r in done if r.hop is not None]
    engine = [r.engine for r in done if r.engine is not None]
    gpu = next((facts for r in done if (facts := pool_state.parse_facts_header(r.gpu))), None)
    warning = None
    if gpu and (gpu["count"] != pool.fit.count
                or not pool_state.gpu_matches(pool.fit.gpu.modal_gpu, gpu["name"])):
        warning = (f"ran on {gpu['count']}x {gpu['name']}, not the {pool.fit.gpu_string} of "
                   f"'{pool.fit.gpu.key}': its numbers are that GPU's (pin the type with "
                   f"modal_gpu: {pool.fit.gpu.modal_gpu.rstrip('!+')}! in models.yaml)")
    return {"gpu_actual": gpu, "gpu_warning": warning,
            "hop_ms": _stats_ms(hops) if hops else None,
            "engine_ms": _stats_ms(engine) if engine else None}


def save_json(data: dict, results_dir: Path, stem: str) -> Path:
    """`data` as `stem`.json in `results_dir` (made if missing), or `stem`-2.json, -3, ... if
    that name is taken: a saved run is never overwritten. --bench and --batch both save so."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{stem}.json"
    n = 1
    while path.exists():
        n += 1
        path = results_dir / f"{stem}-{n}.json"
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


def save_result(result: dict, results_dir: Path) -> Path:
    stamp = result["started_at"].replace(":", "").replace("-", "").split(".")[0]
    return save_json(result, results_dir, f"{result['model']}-{result['gpu']}-{stamp}")


def run_bench(target, settings: Settings, *, results_dir: Path, max_ttft_ms: float | None,
              max_tpot_ms: float | None, as_json: bool) -> int:
    """Wake the model (its cold start is reported, not measured), load it, save, compare."""
    import checks

    settings.check()
    if len(target.models) != 1:
        raise config.UsageError(f"--bench needs --test-model NAME: {target.app.name} serves "
                                f"{', '.join(m.key for m in target.models)}")
    (model,) = target.models

    async def run():
        async with target.endpoint(max_connections=settings.concurrency) as endpoint:
            with checks.progress() as bar:
                bar.add_task(f"waking {model.key} on {target.app.name}", total=None)
                woken = await checks.wake(endpoint, model)
            if not woken.ok:
                return woken, [], 0.0, ""
            started_at = datetime.now(UTC).isoformat(timespec="milliseconds")
            with checks.progress() as bar:
                task = bar.add_task(f"{settings.requests} requests, {settings.concurrency} "
                                    "at a time", total=settings.requests)
                records, wall = await run_load(endpoint, model, settings,
                                               lambda _: bar.advance(task))
            return woken, records, wall, started_at

    woken, records, wall, started_at = asyncio.run(run())
    if not woken.ok:
        raise config.UserError(f"{model.key} did not become ready: {woken.reason}")
    metrics = summarize(records, wall)
    result = build_result(target, model, settings, metrics, woken.ready_after_s, started_at)
    pool = next(p for p in target.app.pools if p.model == model)
    result.update(what_the_endpoint_reported(records, pool))
    # What this run was ranked against: the results page draws the last ranking's targets.
    result["targets"] = {"max_ttft_ms": max_ttft_ms, "max_tpot_ms": max_tpot_ms}
    saved = save_result(result, results_dir)
    rows = rank(latest_per_gpu(load_results(results_dir, model.key), settings),
                max_ttft_ms=max_ttft_ms, max_tpot_ms=max_tpot_ms)
    best = cheapest(rows)
    ok = metrics["failed"] == 0
    import report  # the results page, rewritten with this run (plotly is imported only there)

    page = report.update_after_run(results_dir)
    if as_json:
        import sys

        sys.stdout.write(json.dumps({"result": result, "saved": str(saved), "comparison": rows,
                                     "cheapest": best and best["gpu"]}, indent=2) + "\n")
        sys.stderr.write(page.line + "\n")  # stdout stays one JSON document
        return 0 if ok else 1
    show(result, saved, rows, best, max_ttft_ms=max_ttft_ms, max_tpot_ms=max_tpot_ms)
    from checks import _console

    _console().print(page.line, soft_wrap=True, markup=False)
    return 0 if ok else 1


def _money(value: float | None) -> str:
    return "-" if value is None else f"${value:.2f}"


def _split_text(result: dict) -> str:
    """GPU + CPU + memory of a saved run (runs saved before the split show the total only)."""
    split = result.get("usd_per_hour_split")
    if not split:
        return "GPU, CPU and memory not split"
    return (f"${split['gpu']:.2f} GPU + ${split['cpu']:.2f} CPU + "
            f"${split['memory']:.2f} memory")


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def show(result: dict, saved: Path, rows: list[dict], best: dict | None, *,
         max_ttft_ms: float | None, max_tpot_ms: float | None) -> None:
    from rich.markup import escape
    from rich.table import Table

    from checks import _console, table

    console = _console()
    m, s = result["metrics"], result["settings"]
    metrics = Table(title=f"{result['model']} on {result['gpu']} ({result['gpu_string']}) at "
                          f"{result['endpoint']}", title_justify="left")
    for column in ("metric (ms)", "mean", "p50", "p99"):
        metrics.add_column(column, justify="left" if column.startswith("metric") else "right")
    for label, key in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"),
                       ("E2EL", "e2el_ms")):
        metrics.add_row(label, *(_num(m[key][q]) for q in ("mean", "p50", "p99")))
    # Server-Timing of the first byte: vLLM's own time, and the hop to the pool and back.
    for label, stats in (("of TTFT: vLLM", result.get("engine_ms")),
                         ("of TTFT: Modal hop", result.get("hop_ms"))):
        if stats:
            metrics.add_row(label, *(_num(stats[q]) for q in ("mean", "p50", "p99")))
    console.print(metrics)
    lines = [
        (f"Requests    {m['completed']} completed, {m['failed']} failed in "
        f"{m['duration_s']:.2f} s wall ({s['concurrency']} at a time, {s['input_len']} words "
        f"in, {s['output_len']} tokens out)"),
        (f"Throughput  {_num(m['request_throughput'], 2)} requests/s, "
        f"{_num(m['output_throughput'])} output tokens/s"),
        (f"Wake-up     {result['cold_start_s']:.1f} s to the first one-token completion before "
        "the run (any cold start; not in the metrics)"),
        (f"Cost        {_money(result['usd_per_million_output_tokens'])} per million output "
        f"tokens at ${result['usd_per_hour']:.2f}/h per replica ({_split_text(result)}; "
        f"{result['gpus_per_replica']}x {result['gpu']}) x {result['replicas']} "
        f"(assumes {result['cost_assumption']})"),
        f"Saved       {saved}",
    ]
    gpu = result.get("gpu_actual")
    if gpu:
        lines.insert(-1, escape(f"GPU         {gpu['count']}x {gpu['name']}, driver "
                                f"{gpu['driver']}, vLLM {gpu['vllm']}"))
    if result.get("gpu_warning"):
        lines.insert(-1, f"[yellow]Warning[/yellow]     {escape(result['gpu_warning'])}")
    for error in m["errors"]:
        lines.append(f"[red]Failed[/red]      {escape(error)}")
    for line in lines:
        console.print(line, soft_wrap=True)
    targets = []
    if max_ttft_ms is not None:
        targets.append(f"TTFT p99 <= {max_ttft_ms:g} ms")
    if max_tpot_ms is not None:
        targets.append(f"TPOT p99 <= {max_tpot_ms:g} ms")
    compare = table(f"{result['model']}: saved runs by cost"
                    + (f" ({', '.join(targets)})" if targets else ""),
                    ("#", "gpu", "$/M out tok", "out tok/s", "TTFT p99 ms", "TPOT p99 ms",
                     "targets"), wrap="targets")
    for n, row in enumerate(rows, 1):
        cost = _money(row["usd_per_million_output_tokens"])
        if row.get("gpu_only_cost") and row["usd_per_million_output_tokens"] is not None:
            cost += " (GPU only: an older run)"
        compare.add_row(str(n), row["gpu"], cost,
                        _num(row["output_throughput"]), _num(row["ttft_p99_ms"], 0),
                        _num(row["tpot_p99_ms"], 0),
                        "[green]met[/green]" if row["meets_targets"] else
                        "[red]" + escape("; ".join(row["misses"])) + "[/red]")
    console.print(compare)
    if best is None:
        console.print("[red]No GPU meets the targets.[/red]")
    else:
        console.print(f"Cheapest{' meeting the targets' if targets else ''}: [bold]{best['gpu']}"
                      f"[/bold] at {_money(best['usd_per_million_output_tokens'])} per million "
                      "output tokens.")
