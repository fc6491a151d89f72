"""What the router's designs cost on Modal, measured in an emulation of it (tests/modal_fakes.py:
Modal's calls, Queues and Dicts as the SDK's source says they behave, each RPC taking
--rpc-ms there and back; a container learns of a FunctionCall.cancel at its next 15 s
heartbeat, as modal/_runtime/container_io_manager.py does).

1. Stopping a stream whose client left. Four designs, each against the same stand-in for
   vLLM inside the pool (a chunk every --interval-ms after --first-ms):
     remote_gen            what the router did before: `.remote_gen`, closed when the client
                           leaves (the pool generates on to max_tokens)
     remote_gen + mark     the router's design: the pool waits on a Queue partition named by
                           the stream, the router puts a mark there when the client leaves
     remote_gen + poll     the pool asks a Dict every second whether its stream was cancelled
     spawn + Queue relay   the pool runs a spawned call that puts chunks in a Queue the router
                           reads; the router cancels the FunctionCall when the client leaves
   For each: time to first token (TTFT, the call to the first chunk), each chunk's latency
   (made in the pool to read by the router), how long the pool goes on generating after the
   client left, and the RPCs a stream costs.
2. What the fail-fast check adds to a healthy request (no RPC: a look-up in what it knows).

    uv run python benchmarks/modal_router.py                 # ~2 min
    uv run python benchmarks/modal_router.py --rpc-ms 5 20 50 --leavers 8
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import modal
import modal_fakes
import pytest

import config
import gateway
import gpu_pool
import plan
import pool_state
import router_backend

MATRIX = config.load()
MODEL = MATRIX.models["gemma-3-12b"]
H100 = plan.gpu_app(MATRIX, "h100")
END = b"[END]"


class Tokens:
    """vLLM as a pool sees it: the first chunk after `first` s, then one every `interval` s.
    Each chunk carries the time it was made; `stopped[tag]` is when its generation ended."""

    gpu_header = b""

    def __init__(self, chunks: int, first: float, interval: float):
        self.chunks, self.first, self.interval = chunks, first, interval
        self.stopped: dict[bytes, tuple[float, int]] = {}

    async def stream(self, model, path, body: bytes, headers=None):
        made = 0
        try:
            await asyncio.sleep(self.first)
            for i in range(self.chunks):
                made += 1
                yield b"%d %.9f\n" % (i, time.perf_counter())
                await asyncio.sleep(self.interval)
        finally:
            self.stopped[body] = (time.perf_counter(), made)

    async def aclose(self) -> None:
        pass


def pool_class(tokens: Tokens) -> type:
    """The project's pool class with `tokens` as its engine, plus the two other designs."""
    import modal as sdk

    def boot(self, *, sleep_mode: bool) -> None:
        self.model, self.backend, self.engine = MODEL, tokens, modal_fakes._RunningEngine()

    async def stream_polled(self, path: str, body: bytes, stream_id: str):
        """`stream`, but the cancellation is found by asking a Dict every second."""
        task = asyncio.current_task()
        flags = sdk.Dict.from_name("cancelled-streams", create_if_missing=True)

        async def poll() -> None:
            while not await flags.contains.aio(stream_id):
                await asyncio.sleep(1.0)
            task.cancel()

        poller = asyncio.ensure_future(poll())
        try:
            async for chunk in self.backend.stream(self.model, path, body):
                yield chunk
        finally:
            poller.cancel()

    async def relay(self, path: str, body: bytes, stream_id: str) -> None:
        """A spawned call that puts the chunks in a Queue, batched while a put is in flight."""
        queue = sdk.Queue.from_name("stream-relay", create_if_missing=True)
        ready: list[bytes] = []
        more = asyncio.Event()
        done = False

        async def send() -> None:
            while True:
                await more.wait()
                more.clear()
                batch, ready[:] = list(ready), []
                if batch:
                    await queue.put_many.aio(batch, partition=stream_id)
                if done and not ready:
                    return

        sender = asyncio.ensure_future(send())
        try:
            async for chunk in self.backend.stream(self.model, path, body):
                ready.append(chunk)
                more.set()
        finally:
            done = True
            ready.append(END)
            more.set()
            await sender

    pool = next(p for p in H100.pools if p.model.key == MODEL.key)
    base = gpu_pool.pool_class(pool, H100, "bench_modal_router")
    return type(base.__name__, (base,), {
        "__module__": "bench_modal_router", "_boot": boot,
        "stream_polled": sdk.method()(stream_polled), "relay": sdk.method()(relay)})


# ## The four designs, as a router would run them: yield chunks; `leave()` when the client goes


class Design:
    def __init__(self, workspace, pool):
        self.workspace, self.pool = workspace, pool
        self.instance = pool()


class RemoteGen(Design):
    name = "remote_gen (before)"

    async def open(self, body: bytes):
        self.calls = getattr(self, "calls", {})
        self.calls[body] = self.instance.stream.remote_gen.aio(gateway.COMPLETIONS, body, "")
        async for item in self.calls[body]:
            if isinstance(item, bytes):  # not the (status, headers) the pool sends first
                yield item

    async def leave(self, chunks, body) -> None:
        await chunks.aclose()
        await self.calls[body].aclose()


class RemoteGenMark(Design):
    name = "remote_gen + mark (chosen)"

    def __init__(self, workspace, pool):
        super().__init__(workspace, pool)
        self.backend = router_backend.ModalBackend({MODEL.key: pool})

    async def open(self, body: bytes):
        async for chunk in self.backend.stream(MODEL, gateway.COMPLETIONS, body, []):
            yield chunk

    async def leave(self, chunks, body) -> None:
        await chunks.aclose()
        await self.backend.aclose()


class RemoteGenPoll(Design):
    name = "remote_gen + Dict poll 1 s"

    def open(self, body: bytes):
        self.ids = getattr(self, "ids", {})
        self.ids[body] = os.urandom(8).hex()
        return self.instance.stream_polled.remote_gen.aio(gateway.COMPLETIONS, body,
                                                           self.ids[body])

    async def leave(self, chunks, body) -> None:
        await chunks.aclose()
        flags = modal.Dict.from_name("cancelled-streams", create_if_missing=True)
        await flags.put.aio(self.ids[body], True)


class SpawnRelay(Design):
    name = "spawn + Queue relay + cancel"

    async def open(self, body: bytes):
        self.calls = getattr(self, "calls", {})
        stream_id = os.urandom(8).hex()
        self.calls[body] = await self.instance.relay.spawn.aio(gateway.COMPLETIONS, body,
                                                               stream_id)
        queue = modal.Queue.from_name("stream-relay", create_if_missing=True)
        while True:
            for chunk in await queue.get_many.aio(1000, partition=stream_id):
                if chunk == END:
                    return
                yield chunk

    async def leave(self, chunks, body) -> None:
        await chunks.aclose()
        await self.calls[body].cancel.aio()


DESIGNS = (RemoteGen, RemoteGenMark, RemoteGenPoll, SpawnRelay)


async def one_stream(design, tag: bytes, leave_after: float | None):
    """TTFT and chunk latencies of one stream; if `leave_after`, the client leaves then and
    the result is when it left."""
    started = time.perf_counter()
    chunks = design.open(tag)
    ttft, latencies = None, []
    left = None
    async for chunk in chunks:
        now = time.perf_counter()
        made = float(chunk.split()[1])
        ttft = now - started if ttft is None else ttft
        latencies.append(now - made)
        if leave_after is not None and now - started >= leave_after:
            left = time.perf_counter()
            await design.leave(chunks, tag)
            break
    return ttft, latencies, left


async def measure(design_cls, rpc: float, args, leavers: int) -> dict:
    with pytest.MonkeyPatch.context() as mp:
        workspace = modal_fakes.Workspace(rpc=rpc).patch(mp)
        full = Tokens(args.chunks, args.first_ms / 1000, args.interval_ms / 1000)
        pool = workspace.pool(pool_class(full), max_inputs=1000)
        design = design_cls(workspace, pool)
        await one_stream(design, b"warm-up", None)  # the container's start is not measured
        before = sum(workspace.rpcs.values())
        ttfts, latencies = [], []
        for n in range(args.streams):
            ttft, lat, _ = await one_stream(design, b"s%d" % n, None)
            ttfts.append(ttft)
            latencies += lat
        per_stream = (sum(workspace.rpcs.values()) - before) / args.streams
        result = {"ttft": ttfts, "latency": latencies, "rpcs": per_stream}
        if leavers:
            # Clients leave at times spread over a heartbeat period, from streams long enough
            # to outlast it; how long does the pool go on generating?
            long = args.leave_window + 5
            full.chunks = int(long / (args.interval_ms / 1000))
            rng = random.Random(7)
            tags = [b"leaver%d" % n for n in range(leavers)]
            times = [1 + rng.random() * args.leave_window for _ in tags]
            runs = await asyncio.gather(*(one_stream(design, tag, t)
                                          for tag, t in zip(tags, times, strict=True)))
            deadline = time.perf_counter() + long + 20
            while any(tag not in full.stopped for tag in tags) and time.perf_counter() < deadline:
                await asyncio.sleep(0.05)
            result["went_on"] = [full.stopped[tag][0] - left
                                 for tag, (_, _, left) in zip(tags, runs, strict=True)
                                 if tag in full.stopped]
        await workspace.shutdown()
        return result


def ms(values, q=None) -> str:
    if not values:
        return "-"
    if q is None:
        return f"{statistics.fmean(values) * 1000:.1f}"
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] * 1000:.1f}"


async def fail_fast_cost(requests: int) -> tuple[float, float]:
    """Mean µs per send() against an instant pool, without and with the failure check."""

    class Instant:
        def __init__(self):
            result = (200, b"{}", [])

            class Call:
                get = type("G", (), {"aio": staticmethod(lambda: _done(result))})
                cancel = type("C", (), {"aio": staticmethod(lambda: _done(None))})

            class Method:
                spawn = type("S", (), {"aio": staticmethod(lambda *a: _done(Call()))})

            self.request = Method()

    backends = [router_backend.ModalBackend({MODEL.key: Instant}, failures=failures,
                                            deadline=5400)  # as the router runs
                for failures in (None, pool_state.FailureWatch("vllm-h100"))]
    rounds: list[list[float]] = [[], []]
    for _ in range(7):  # interleaved rounds, the median of each
        for n, backend in enumerate(backends):
            started = time.perf_counter()
            for _ in range(requests):
                await backend.send(MODEL, gateway.CHAT, b"{}", [])
            rounds[n].append((time.perf_counter() - started) / requests * 1e6)
    return statistics.median(rounds[0]), statistics.median(rounds[1])


async def _done(value):
    return value


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rpc-ms", type=float, nargs="+", default=[5, 20, 50])
    parser.add_argument("--streams", type=int, default=10, help="full streams per design")
    parser.add_argument("--chunks", type=int, default=100)
    parser.add_argument("--first-ms", type=float, default=50)
    parser.add_argument("--interval-ms", type=float, default=20)
    parser.add_argument("--leavers", type=int, default=8, help="clients that leave, per design")
    parser.add_argument("--leave-window", type=float, default=15.0,
                        help="seconds over which they leave (Modal's heartbeat: 15)")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}; {args.streams} streams of {args.chunks} "
          f"chunks ({args.first_ms:g} ms to the first, then one every {args.interval_ms:g} ms) "
          "per design and RPC latency\n")
    print(f"{'design':30} {'rpc ms':>6} {'TTFT p50':>9} {'chunk p50':>10} {'chunk p99':>10} "
          f"{'RPCs':>6} {'pool went on after the client left (s): p50, max':>50}")
    for rpc in args.rpc_ms:
        for design in DESIGNS:
            leavers = args.leavers if rpc == args.rpc_ms[len(args.rpc_ms) // 2] else 0
            r = await measure(design, rpc / 1000, args, leavers)
            went_on = r.get("went_on")
            stop = "-" if went_on is None else (
                f"{statistics.median(went_on):.2f}, {max(went_on):.2f}" if went_on else "never")
            print(f"{design.name:30} {rpc:6g} {ms(r['ttft'], 50):>9} {ms(r['latency'], 50):>10} "
                  f"{ms(r['latency'], 99):>10} {r['rpcs']:6.1f} {stop:>50}", flush=True)
    without, with_check = await fail_fast_cost(5000)
    print(f"\nfail-fast check on a healthy pool: send() {without:.1f} us without it, "
          f"{with_check:.1f} us with it ({with_check - without:+.2f} us, no RPC; medians of 7 "
          "interleaved rounds)")


if __name__ == "__main__":
    asyncio.run(main())
