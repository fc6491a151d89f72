"""Is `deploy.py --batch` ever the bottleneck? The same requests at the same concurrency
through `--batch` (a subprocess, as users run it) and through a minimal asyncio loop
(aiohttp, uvloop, no retries, no output file), both against the vLLM stand-in behind
`deploy.py --serve-local`, interleaved round by round.

    uv run python benchmarks/batch_throughput.py           # prints a table; --check exits 1
                                                            # if --batch < 0.9x the loop

Throughput is answered requests per second from the first request sent to the last
answer: `--batch`'s own summary (`totals.requests_per_s`, its wall time, so Python's
start-up and the file check are not in it; they are printed apart) against the loop's.
The stand-in takes `--delay` seconds per request, like a short generation, so requests/s
show whether the client keeps a real backend busy; with `--delay 0` all three processes
compete for the CPU and the ratio shows how much CPU each client spends instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from servers import ProcessServer, free_port

KEY = "sk-bench-" + secrets.token_hex(12)
MODEL = "google/gemma-3-12b-it"


def write_input(path: Path, n: int) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({
            "custom_id": f"request-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gemma-3-12b", "max_tokens": 16, "messages": [
                {"role": "user", "content": f"Question {i}: what is {i} + {i}?"}]}}) + "\n"
            for i in range(n))


def read_bodies(path: Path) -> list[bytes]:
    with open(path, "rb") as f:
        return [json.dumps(json.loads(line)["body"]).encode() for line in f]


async def minimal_loop(url: str, bodies: list[bytes], concurrency: int) -> float:
    """The least a client can do: every body encoded up front, `concurrency` workers each
    sending the next one as soon as its answer is read."""
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    todo = iter(bodies)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async def worker() -> None:
            for body in todo:
                async with session.post(url + "/v1/chat/completions", data=body,
                                        headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"HTTP {resp.status}")

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return len(bodies) / (time.perf_counter() - start)


def run_minimal(url: str, path: Path, concurrency: int) -> float:
    import uvloop

    bodies = read_bodies(path)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(minimal_loop(url, bodies, concurrency))


def run_batch(url: str, path: Path, out: Path, concurrency: int) -> tuple[float, float]:
    """(requests/s of the run itself, seconds of the whole subprocess)."""
    out.unlink(missing_ok=True)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "deploy.py"), "--batch", "h100", "--input", str(path),
         "-o", str(out), "--base-url", url, "--concurrency", str(concurrency), "--json"],
        env={**os.environ, "VLLM_API_KEY": KEY}, cwd=out.parent, capture_output=True, text=True,
        check=False)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"--batch exited {proc.returncode}: {proc.stderr[-500:]}")
    totals = json.loads(proc.stdout)["totals"]
    if totals["requests_ok"] != len(read_bodies(path)):
        raise RuntimeError(f"--batch answered {totals['requests_ok']} requests")
    return totals["requests_ok"] / totals["wall_s"], took


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=4000, help="requests per round")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--delay", type=float, default=0.1, help="the stand-in's seconds/request")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--results", type=Path, default=ROOT / "results" / "batch-bench")
    p.add_argument("--check", action="store_true", help="exit 1 below 0.9x the minimal loop")
    a = p.parse_args()
    a.results.mkdir(parents=True, exist_ok=True)
    path = a.results / "requests.jsonl"
    write_input(path, a.requests)
    py = sys.executable
    up_port, gw_port = free_port(), free_port()
    figures: dict[str, list[float]] = {"batch": [], "loop": [], "batch_process_s": []}
    load_before = os.getloadavg()
    with contextlib.ExitStack() as stack:
        log = stack.enter_context((a.results / "gateway.log").open("w"))
        up = stack.enter_context(ProcessServer(
            [py, str(ROOT / "tests" / "standin.py"), "--port", str(up_port),
             "--served-model-name", MODEL, "--delay", str(a.delay)], up_port))
        gw = stack.enter_context(ProcessServer(
            [py, str(ROOT / "deploy.py"), "--serve-local", "--port", str(gw_port),
             "--upstream", f"gemma-3-12b={up.url}"], gw_port,
            env={**os.environ, "VLLM_API_KEY": KEY}, log=log))
        run_minimal(gw.url, path, a.concurrency)  # warm up both servers
        for r in range(a.rounds):
            order = ("batch", "loop") if r % 2 == 0 else ("loop", "batch")
            for name in order:
                time.sleep(1)  # let the previous client's connections close
                if name == "loop":
                    figures["loop"].append(run_minimal(gw.url, path, a.concurrency))
                else:
                    rps, took = run_batch(gw.url, path, a.results / "out.jsonl", a.concurrency)
                    figures["batch"].append(rps)
                    figures["batch_process_s"].append(took)
            print(f"round {r + 1}: --batch {figures['batch'][-1]:7.1f} req/s   minimal loop "
                  f"{figures['loop'][-1]:7.1f} req/s", flush=True)
    load_after = os.getloadavg()
    batch, loop = statistics.median(figures["batch"]), statistics.median(figures["loop"])
    ratio = batch / loop
    ideal = a.concurrency / a.delay if a.delay else float("inf")
    print(f"\n{a.requests} chat requests a round, {a.concurrency} in flight, stand-in "
          f"{a.delay * 1000:g} ms/request (at most {ideal:.0f} req/s), {a.rounds} rounds")
    print(f"  --batch        median {batch:7.1f} req/s  (runs {min(figures['batch']):.1f} .. "
          f"{max(figures['batch']):.1f})")
    print(f"  minimal loop   median {loop:7.1f} req/s  (runs {min(figures['loop']):.1f} .. "
          f"{max(figures['loop']):.1f})")
    print(f"  ratio {ratio:.3f}  (target >= 0.9)")
    print(f"  --batch's whole process: median {statistics.median(figures['batch_process_s']):.2f}"
          " s (start-up, file check, run, summary)")
    print(f"  load average before {load_before[0]:.2f}, after {load_after[0]:.2f} "
          f"({os.cpu_count()} CPUs)")
    (a.results / "batch_throughput.json").write_text(json.dumps({
        "requests": a.requests, "concurrency": a.concurrency, "delay_s": a.delay,
        "rounds": a.rounds, "figures": figures, "ratio": ratio,
        "load": [load_before[0], load_after[0]]}, indent=2))
    return 1 if a.check and ratio < 0.9 else 0


if __name__ == "__main__":
    sys.exit(main())
