"""What the gateway adds: the same requests sent directly to a vLLM stand-in, through our
gateway (`deploy.py --serve-local`), and through the LiteLLM proxy, interleaved in one run.

    uv run python benchmarks/gateway_overhead.py            # prints a table, writes results/

Everything runs on loopback as separate processes. LiteLLM is installed only into its own
virtualenv (results/litellm-venv, created on first use with `uv venv` + `uv pip install`);
`--no-litellm` skips it. Two stand-ins: an instant one for latency, and one that takes
`--delay` seconds per request (like a short generation) for throughput, so requests/s show
whether a proxy limits a real backend rather than how three processes share two cores.
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

LITELLM = "litellm[proxy]==1.108.7"
FAST, SLOW = "google/gemma-3-12b-it", "google/gemma-3-27b-it"  # instant / delayed stand-in
KEY = "sk-bench-" + secrets.token_hex(12)


def chat(model: str, stream: bool) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}],
                       "max_tokens": 16, "stream": stream}).encode()


async def one(session, url: str, body: bytes, headers: dict, stream: bool) -> float:
    """Seconds to the whole JSON answer, or (streaming) to the first data event."""
    t0 = time.perf_counter()
    async with session.post(url, data=body, headers=headers) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status}: {(await resp.read())[:200]!r}")
        if not stream:
            await resp.read()
            return time.perf_counter() - t0
        first = None
        async for chunk in resp.content.iter_any():
            if first is None and b"data: {" in chunk:
                first = time.perf_counter() - t0
        return first


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if q < 100 else max(values)


async def latency(targets: dict, n: int, stream: bool, block: int = 25) -> dict[str, list]:
    """Sequential requests in blocks, the targets taking turns (so drift hits all alike); a
    pause between blocks lets a proxy's after-response work (LiteLLM's logging, cost
    tracking) finish instead of landing on the next target's requests."""
    times = {name: [] for name in targets}
    names = list(targets)
    async with aiohttp.ClientSession() as session:
        for b in range(-1, -(-n // block)):  # block -1 warms connections and caches
            for name in names[b % len(names):] + names[:b % len(names)]:
                url, headers = targets[name]
                await asyncio.sleep(0.05)
                for _ in range(block):
                    t = await one(session, url, chat(FAST, stream), headers, stream)
                    if b >= 0:
                        times[name].append(t)
    return times


async def throughput(url: str, headers: dict, model: str, clients: int, seconds: float):
    done = errors = 0
    body = chat(model, False)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        deadline = time.perf_counter() + seconds

        async def client():
            nonlocal done, errors
            while time.perf_counter() < deadline:
                try:
                    await one(session, url, body, headers, False)
                    done += 1
                except (RuntimeError, aiohttp.ClientError):
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return done, errors, time.perf_counter() - t0


async def rates(targets: dict, model: str, clients: int, seconds: float, rounds: int) -> dict:
    totals = {name: [0, 0, 0.0] for name in targets}
    names = list(targets)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            url, headers = targets[name]
            await asyncio.sleep(1)  # let the previous target's backlog drain
            done, errors, took = await throughput(url, headers, model, clients, seconds)
            totals[name][0] += done
            totals[name][1] += errors
            totals[name][2] += took
    return {name: {"rps": d / t, "errors": e} for name, (d, e, t) in totals.items()}


def litellm_python(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not (venv / "bin" / "litellm").exists():
        print(f"installing {LITELLM} into {venv} (once)", flush=True)
        subprocess.run(["uv", "venv", "-q", "--allow-existing", str(venv), "-p", "3.11"],
                       check=True)
        subprocess.run(["uv", "pip", "install", "-q", "--python", str(python), LITELLM,
                        "opentelemetry-sdk"], check=True)
    return venv / "bin" / "litellm"


def litellm_config(path: Path, fast_url: str, slow_url: str) -> None:
    models = [{"model_name": name, "litellm_params": {
        "model": f"openai/{name}", "api_base": f"{url}/v1", "api_key": "unused"}}
        for name, url in ((FAST, fast_url), (SLOW, slow_url))]
    path.write_text(json.dumps({"model_list": models,
                                "general_settings": {"master_key": KEY},
                                "litellm_settings": {"telemetry": False}}))


def report(lat: dict, ttft: dict, rps: dict, loaded: dict | None) -> dict:
    out = {"added_ms": {}, "rps": rps, "rps_instant_backend": loaded}
    direct = "direct"
    print(f"\n{'':10} {'JSON p50':>9} {'p99':>7} {'TTFT p50':>9} {'p99':>7}   (ms, absolute)")
    for name, times in lat.items():
        print(f"{name:10} {pct(times, 50) * 1e3:9.3f} {pct(times, 99) * 1e3:7.3f} "
              f"{pct(ttft[name], 50) * 1e3:9.3f} {pct(ttft[name], 99) * 1e3:7.3f}")
    print(f"\n{'added':10} {'JSON p50':>9} {'p99':>7} {'TTFT p50':>9} {'p99':>7}   (ms over direct)")
    for name in lat:
        if name == direct:
            continue
        added = {f"{kind}_{q}": round((pct(src[name], q) - pct(src[direct], q)) * 1e3, 3)
                 for kind, src in (("json", lat), ("ttft", ttft)) for q in (50, 99)}
        out["added_ms"][name] = added
        print(f"{name:10} {added['json_50']:9.3f} {added['json_99']:7.3f} "
              f"{added['ttft_50']:9.3f} {added['ttft_99']:7.3f}")
    print("\nrequests/s at 32 clients (backend takes the delay):")
    for name, r in rps.items():
        print(f"  {name:10} {r['rps']:8.1f}  {r['rps'] / rps[direct]['rps']:.2f}x direct"
              f"  errors {r['errors']}")
    if loaded:
        print("requests/s at 32 clients, instant backend (CPU-bound: all share 2 cores):")
        for name, r in loaded.items():
            print(f"  {name:10} {r['rps']:8.1f}  {r['rps'] / loaded[direct]['rps']:.2f}x direct")
    if "litellm" in out["added_ms"]:
        ours, theirs = out["added_ms"]["gateway"], out["added_ms"]["litellm"]
        print("\ngateway's added p50 as a share of LiteLLM's: "
              f"JSON {ours['json_50'] / theirs['json_50']:.3f}, "
              f"TTFT {ours['ttft_50'] / theirs['ttft_50']:.3f}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=400, help="sequential requests per target")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=3.0, help="per throughput round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--delay", type=float, default=0.05, help="the slow stand-in's seconds/request")
    p.add_argument("--no-litellm", action="store_true")
    p.add_argument("--results", type=Path, default=ROOT / "results")
    a = p.parse_args()
    a.results.mkdir(parents=True, exist_ok=True)
    py, standin = sys.executable, str(ROOT / "tests" / "standin.py")
    ports = {name: free_port() for name in ("fast", "slow", "gateway", "litellm")}
    env = {**os.environ, "VLLM_API_KEY": KEY}
    with contextlib.ExitStack() as stack:
        log = stack.enter_context((a.results / "gateway_overhead.log").open("w"))
        fast = stack.enter_context(ProcessServer(
            [py, standin, "--port", str(ports["fast"]), "--served-model-name", FAST],
            ports["fast"]))
        slow = stack.enter_context(ProcessServer(
            [py, standin, "--port", str(ports["slow"]), "--served-model-name", SLOW,
             "--delay", str(a.delay)], ports["slow"]))
        gw = stack.enter_context(ProcessServer(
            [py, str(ROOT / "deploy.py"), "--serve-local", "--port", str(ports["gateway"]),
             "--upstream", f"gemma-3-12b={fast.url}", "--upstream", f"gemma-3-27b={slow.url}"],
            ports["gateway"], env=env, log=log))
        auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
        plain = {"Content-Type": "application/json"}
        path = "/v1/chat/completions"
        fast_targets = {"direct": (fast.url + path, plain), "gateway": (gw.url + path, auth)}
        slow_targets = {"direct": (slow.url + path, plain), "gateway": (gw.url + path, auth)}
        if not a.no_litellm:
            binary = litellm_python(a.results / "litellm-venv")
            config_file = a.results / "litellm_config.json"
            litellm_config(config_file, fast.url, slow.url)
            lenv = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
                    "LITELLM_TELEMETRY": "False", "NO_DOCS": "True"}
            lite = stack.enter_context(ProcessServer(
                [str(binary), "--config", str(config_file), "--host", "127.0.0.1",
                 "--port", str(ports["litellm"]), "--num_workers", "1"],
                ports["litellm"], env=lenv, log=log, timeout=300))
            fast_targets["litellm"] = (lite.url + path, auth)
            slow_targets["litellm"] = (lite.url + path, auth)
        print(f"latency: {a.requests} sequential requests per target, interleaved", flush=True)
        lat = asyncio.run(latency(fast_targets, a.requests, stream=False))
        ttft = asyncio.run(latency(fast_targets, a.requests, stream=True))
        print(f"throughput: {a.clients} clients, {a.rounds} x {a.seconds:g}s per target",
              flush=True)
        rps = asyncio.run(rates(slow_targets, SLOW, a.clients, a.seconds, a.rounds))
        loaded = asyncio.run(rates(fast_targets, FAST, a.clients, a.seconds, a.rounds))
    result = report(lat, ttft, rps, loaded)
    result["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
    (a.results / "gateway_overhead.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
