"""What a model's GPU pool tells the router and `--status` beyond its answers.

Two named Modal objects that every container of the environment can reach:

- `plan.STATE_DICT`, a modal.Dict keyed by app and model, holds each pool's last start-up
  failure and the GPU it actually runs on. A vLLM that dies inside `@modal.enter` makes Modal
  restart the container again and again (a crash loop) before any caller sees an error; the
  failure record lets the router answer 503 with the reason at once instead. A later
  successful start clears it, and so does a deploy. The GPU facts say what Modal gave: an
  "H100" request may run on an H200 ("H100!" pins it).
- `plan.CANCEL_QUEUE`, a modal.Queue with one partition per stream, carries the mark that
  stops a stream whose client left. `.remote_gen` never cancels the remote generator (only
  `FunctionCall.cancel` sends FunctionCallCancel, modal/_functions.py, and a generator cannot
  be spawned: `_Function.spawn` raises InvalidError), so the pool waits on its stream's
  partition and the router puts a mark there when the client goes. Why this and not a
  spawned call relaying chunks through a Queue: README, "The Modal apps" (measured).

Modal is imported only inside the functions that call it: bench.py reads the GPU header
with `parse_facts_header` and must not import the SDK.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import re
import subprocess
import time

import plan

log = logging.getLogger("pool_state")

FRESH_SECONDS = 300  # a failure this recent is answered at once; older, the pool is tried again
SLOW_CALL_SECONDS = 3.0  # a pool call still waiting after this consults the failure record...
CHECK_EVERY_SECONDS = 10.0  # ...and again this often while it keeps waiting
MARK_TIMEOUT_SECONDS = 10.0  # a cancel mark the Queue will not take by then is given up
GPU_HEADER = b"x-vllm-gpu"  # "NVIDIA H100 80GB HBM3; count=1; driver=580.82.07; vllm=0.33.0"


def failure_key(app: str, model: str) -> str:
    return f"failure:{app}:{model}"


def gpu_key(app: str, model: str) -> str:
    return f"gpu:{app}:{model}"


def headline(exc: BaseException, limit: int = 300) -> str:
    """The first line of an error, without vLLM's log tail (that stays in the container's log)."""
    text = str(exc).split("; last log lines")[0].strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first if len(first) <= limit else first[: limit - 1] + "…"


def server_timing(name: str, started: float) -> tuple[bytes, bytes]:
    """A Server-Timing header entry for the time since `started` (time.perf_counter), in ms."""
    return b"server-timing", b"%s;dur=%.1f" % (name.encode(), (time.perf_counter() - started) * 1000)


def parse_server_timing(values: list[str]) -> dict[str, float]:
    """Server-Timing header values (`engine;dur=12.5, pool;dur=40.1`) as {name: ms}; entries
    without a duration are left out."""
    found = {}
    for entry in (e.strip() for value in values for e in value.split(",")):
        name, *params = (p.strip() for p in entry.split(";"))
        for param in params:
            key, _, number = param.partition("=")
            if key == "dur" and name:
                try:
                    found[name] = float(number)
                except ValueError:
                    pass
    return found


def is_fresh(record, now: float | None = None) -> bool:
    return (isinstance(record, dict) and isinstance(record.get("at"), int | float)
            and (now if now is not None else time.time()) - record["at"] < FRESH_SECONDS)


# ## The GPU a container got


def parse_nvidia_smi(text: str) -> dict | None:
    """`nvidia-smi --query-gpu=name,driver_version --format=csv,noheader`: one line per GPU."""
    rows = [[part.strip() for part in line.split(",")] for line in text.splitlines()
            if line.strip()]
    if not rows or any(len(row) != 2 or not all(row) for row in rows):
        return None
    names = sorted({row[0] for row in rows})
    return {"name": " + ".join(names), "count": len(rows), "driver": rows[0][1]}


def vllm_version() -> str:
    try:
        return importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def gpu_facts() -> dict | None:
    """What this container runs on: GPU model, count, driver, and the vLLM installed.

    None without nvidia-smi (Modal's GPU containers have it; nothing else here needs it).
    """
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version",
                               "--format=csv,noheader"], capture_output=True, text=True,
                              timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    facts = parse_nvidia_smi(done.stdout)
    return {**facts, "vllm": vllm_version()} if facts else None


def gpu_matches(modal_gpu: str, name: str) -> bool:
    """Whether an nvidia-smi GPU name is what a Modal GPU string asks for: "H100" or "H100!"
    is "NVIDIA H100 80GB HBM3", "A100-80GB" is "NVIDIA A100-SXM4-80GB", "L40S" is "NVIDIA L40S"
    (an "H100" served by an H200 is not)."""
    wanted = modal_gpu.split(":")[0].rstrip("!+").upper()
    model, _, memory = wanted.partition("-")
    words = re.split(r"[\s\-+]+", name.upper())
    return model in words and (not memory or memory in words)


def facts_header(facts: dict | None) -> bytes:
    if not facts:
        return b""
    text = f"{facts['name']}; count={facts['count']}; driver={facts['driver']}; vllm={facts['vllm']}"
    return text.encode("ascii", "replace")


def parse_facts_header(value: str | None) -> dict | None:
    """The header back into {"name", "count", "driver", "vllm"}; None if absent or malformed."""
    if not value:
        return None
    name, *fields = (part.strip() for part in value.split(";"))
    pairs = dict(field.partition("=")[::2] for field in fields)
    if not name or not pairs.get("count", "").isdigit() or not {"driver", "vllm"} <= pairs.keys():
        return None
    return {"name": name, "count": int(pairs["count"]), "driver": pairs["driver"],
            "vllm": pairs["vllm"]}


# ## The records: written by the pools, read by the router, --status and deploy


class Records:
    """The environment's state Dict, opened on first use (a container that never reports
    opens nothing; the handle hydrates with one RPC the first time)."""

    def __init__(self, environment: str | None = None, *, create: bool = True):
        self.environment, self.create = environment, create
        self._dict = None

    def dict(self):
        if self._dict is None:
            import modal

            self._dict = modal.Dict.from_name(plan.STATE_DICT, environment_name=self.environment,
                                              create_if_missing=self.create)
        return self._dict

    # Inside a GPU container (synchronous: `@modal.enter` hooks are).

    def report_failure(self, app: str, model: str, exc: BaseException) -> None:
        """Record why the engine did not start. Never raises: the original error must reach
        Modal, which restarts the container, unchanged."""
        try:
            self.dict().put(failure_key(app, model), {"error": headline(exc), "at": time.time()})
        except Exception as err:  # noqa: BLE001 - reporting must not mask the failure
            print(f"could not record the start-up failure: {type(err).__name__}: {err}")

    def report_ready(self, app: str, model: str, facts: dict | None) -> None:
        """The engine started: record the GPU it got and clear any failure."""
        try:
            if facts:
                self.dict().put(gpu_key(app, model), {**facts, "at": time.time()})
            self.dict().pop(failure_key(app, model), None)
        except Exception as err:  # noqa: BLE001 - a record is worth less than a ready engine
            print(f"could not record the engine's start: {type(err).__name__}: {err}")

    # In the router.

    async def fresh_failure(self, app: str, model: str) -> dict | None:
        """One RPC: the pool's failure record if it is fresh; None if none, stale or unreadable."""
        try:
            record = await self.dict().get.aio(failure_key(app, model))
        except Exception as err:  # noqa: BLE001 - a failed look-up must not fail the request
            log.warning("reading the failure record of %s failed: %s", model, type(err).__name__)
            return None
        return record if is_fresh(record) else None

    # From the command line.

    def read(self) -> dict:
        """Every record, by key; empty if the Dict was never created (nothing ever reported)."""
        import modal

        try:
            return dict(self.dict().items())
        except modal.exception.NotFoundError:
            return {}

    def clear_failures(self, app: str, models: list[str]) -> None:
        """A deploy starts clean: a failure of the previous deployment says nothing of this one."""
        for model in models:
            self.dict().pop(failure_key(app, model), None)


class FailureWatch:
    """The router's view of the failure records: fresh failures it has seen, kept until
    they go stale, so that a healthy pool costs no RPC and a failed one is answered at once.

    A failure older than the pool's last answer does not count: a replica that is up and
    answering outweighs another one that could not start (a scale-up that failed).
    """

    def __init__(self, app: str, records: Records | None = None):
        self.app = app
        self.records = records or Records()
        self.seen: dict[str, dict] = {}  # model key -> a fresh failure record
        self.answered: dict[str, float] = {}  # model key -> when its pool last answered

    def _counts(self, model: str, record: dict | None) -> bool:
        return (record is not None and is_fresh(record)
                and record["at"] > self.answered.get(model, 0.0))

    def known(self, model: str) -> dict | None:
        """A fresh failure already seen (no RPC)."""
        record = self.seen.get(model)
        if record is not None and not self._counts(model, record):
            del self.seen[model]
            return None
        return record

    async def check(self, model: str) -> dict | None:
        record = await self.records.fresh_failure(self.app, model)
        if not self._counts(model, record):
            self.seen.pop(model, None)
            return None
        self.seen[model] = record
        return record

    def pool_answered(self, model: str) -> None:
        self.answered[model] = time.time()


def describe(record: dict) -> tuple[str, int]:
    """The client's 503 message for a failure record, and its Retry-After."""
    age = max(0, int(time.time() - record["at"]))
    return (f"model engine failed to start {age} s ago: {record.get('error', 'unknown error')}",
            max(1, FRESH_SECONDS - age))


# ## Stopping a stream whose client left


class CancelMarks:
    """One Queue partition per stream: the router marks it, the pool is waiting on it."""

    def __init__(self, ttl_seconds: int = plan.MODAL_MAX_TIMEOUT):
        # A mark must outlive a queued input and a cold start; Modal clears the partition after.
        self.ttl = ttl_seconds
        self._queue = None

    def queue(self):
        if self._queue is None:
            import modal

            self._queue = modal.Queue.from_name(plan.CANCEL_QUEUE, create_if_missing=True)
        return self._queue

    async def mark(self, stream_id: str) -> None:
        """The router's side: one RPC, only for a stream whose client left.

        With a timeout: a blocking put without one retries a full Queue (RESOURCE_EXHAUSTED:
        100,000 partitions) and transient errors for ever (modal/queue.py, _put_many_blocking:
        Retry(max_retries=None, total_timeout=timeout)), and each such mark would stay a task
        in the router. Past it the SDK raises queue.Full or modal.exception.TimeoutError.
        """
        await self.queue().put.aio(True, partition=stream_id, partition_ttl=self.ttl,
                                   timeout=MARK_TIMEOUT_SECONDS)

    def watch(self, stream_id: str, task: asyncio.Task) -> asyncio.Task:
        """The pool's side: cancel `task` (the input's own task, as FunctionCall.cancel would:
        modal/_container_entrypoint.py, make_async_cancel_callback) when the mark arrives.
        One blocking get, which the SDK renews every 50 s (modal/queue.py, _get_blocking);
        the caller cancels the watcher when the stream ends on its own."""

        async def wait_for_mark() -> None:
            try:
                await self.queue().get.aio(partition=stream_id)
            except Exception as err:  # noqa: BLE001 - without a mark the stream just runs on
                log.warning("cannot watch for the stream's cancel mark: %s", type(err).__name__)
                return
            task.cancel()

        return asyncio.ensure_future(wait_for_mark())
