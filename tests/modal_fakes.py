"""Stand-ins for the Modal 1.6.4 SDK objects the apps call, behaving as the SDK's own source
says they do, awkward parts included (paths are under modal/ in the installed SDK):

- `Function.spawn` returns a FunctionCall as soon as the input exists; `FunctionCall.get`
  blocks until the result; `get(timeout=)` raises Python's TimeoutError when none came
  (_functions.py, _Invocation.poll_function). Spawning a generator raises InvalidError
  (_functions.py, _Function.spawn).
- `FunctionCall.cancel` stops the remote work: an input not started yet never runs; a
  running one has its task cancelled in the container when the container's next heartbeat
  brings the cancellation (_runtime/container_io_manager.py, _run_heartbeat_loop and
  _heartbeat_handle_cancellations, every `heartbeat_interval` = 15 s by default in
  config.py). `get` then raises RemoteError: a TERMINATED result carries no data
  (_runtime/container_io_manager.py, output_items_cancellation; _utils/function_utils.py,
  _process_result).
- `.remote_gen`: a consumer that stops iterating only stops reading; the remote generator
  runs on (nothing but FunctionCall.cancel sends FunctionCallCancel). `.remote` likewise.
- An input past the function's `timeout` raises FunctionTimeoutError, which derives from
  modal.exception.TimeoutError, not from Python's TimeoutError.
- A method's own exception reaches the caller as itself (deserialized).
- `@modal.enter` failures crash-loop: every attempt is a new container, a new instance of
  the class, until Modal gives up; then the waiting inputs fail with the start-up exception
  itself (_utils/function_utils.py, _process_result: "exception that occurred during
  container startup (crash looping) that eventually got escalated to input failures").
- Every RPC takes `rpc` seconds there and back; what a stream or a long poll delivers
  arrives half of that after the server has it. Generator outputs are sent in batches, one
  RPC at a time, as generator_output_sender does (_runtime/container_io_manager.py).
- modal.Dict (get, put, pop, contains, items) and modal.Queue (partitions, blocking get).

`Workspace.patch(monkeypatch)` puts its Dicts and Queues behind `modal.Dict.from_name` and
`modal.Queue.from_name`; `Workspace.pool(user_cls)` stands in for a deployed `modal.Cls`.
Everything runs on the event loop of whoever calls it; `@modal.enter` hooks, which are
synchronous, run in a thread as they block.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import inspect
import queue as stdlib_queue
import threading
import time
from typing import Any

import modal
import modal.exception
from modal._partial_function import _find_partial_methods_for_user_cls
from modal._partial_function import _PartialFunctionFlags as Flags
from modal.types import FunctionCurrentStats

HEARTBEAT_INTERVAL = 15.0  # seconds: modal/config.py, "heartbeat_interval"


class _Op:
    """A Modal method: `obj.op(...)` blocks, `await obj.op.aio(...)` does not."""

    def __init__(self, workspace: Workspace, name: str, fn):
        self.workspace, self.name, self.fn = workspace, name, fn

    def __call__(self, *args, **kwargs):
        self.workspace.count(self.name)
        time.sleep(self.workspace.rpc)
        return self.fn(*args, **kwargs)

    async def aio(self, *args, **kwargs):
        self.workspace.count(self.name)
        await asyncio.sleep(self.workspace.rpc)
        return self.fn(*args, **kwargs)


class FakeDict:
    """modal.Dict: a mapping on the server, one RPC per operation."""

    def __init__(self, workspace: Workspace):
        self.data: dict = {}
        self.lock = threading.Lock()
        self.get = _Op(workspace, "DictGet", lambda key, default=None: self.data.get(key, default))
        self.contains = _Op(workspace, "DictContains", lambda key: key in self.data)
        self.put = _Op(workspace, "DictUpdate", self._put)
        self.pop = _Op(workspace, "DictPop", self._pop)
        self.items = _Op(workspace, "DictContents", lambda: list(self.data.items()))

    def _put(self, key, value, *, skip_if_exists: bool = False) -> bool:
        with self.lock:
            if skip_if_exists and key in self.data:
                return False
            self.data[key] = value
            return True

    _MISSING = object()

    def _pop(self, key, default=_MISSING):
        with self.lock:
            if default is self._MISSING:
                return self.data.pop(key)  # KeyError, as modal.Dict.pop without a default
            return self.data.pop(key, default)


class FakeQueue:
    """modal.Queue with partitions: FIFO per partition, blocking gets as long polls.

    Its limits are Modal's (https://modal.com/docs/guide/queues): 100,000 partitions of
    5,000 items. A blocking put into a full Queue retries until its `timeout`, for ever
    without one, then raises queue.Full (modal/queue.py, _put_many_blocking: RESOURCE_EXHAUSTED
    is retried with max_retries=None, total_timeout=timeout); a non-blocking one raises at once.
    """

    MAX_PARTITIONS = 100_000
    MAX_ITEMS = 5_000

    def __init__(self, workspace: Workspace):
        self.workspace = workspace
        self.max_partitions, self.max_items = self.MAX_PARTITIONS, self.MAX_ITEMS
        self.partitions: dict[str | None, collections.deque] = collections.defaultdict(
            collections.deque)
        self.ttls: dict[str | None, int] = {}
        self._changed: asyncio.Condition | None = None
        self.put = _AsyncOp(self._put)
        self.put_many = _AsyncOp(self._put_many)
        self.get = _AsyncOp(self._get)
        self.get_many = _AsyncOp(self._get_many)

    def changed(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def _put(self, value, block: bool = True, timeout=None, *, partition=None,
                   partition_ttl: int = 24 * 3600) -> None:
        await self._put_many([value], block, timeout, partition=partition,
                             partition_ttl=partition_ttl)

    async def _put_many(self, values: list, block: bool = True, timeout=None, *, partition=None,
                        partition_ttl: int = 24 * 3600) -> None:
        self.workspace.count("QueuePut")
        half = self.workspace.rpc / 2
        await asyncio.sleep(half)
        async with self.changed():
            def room() -> bool:
                known = partition in self.partitions and bool(self.partitions[partition])
                used = sum(1 for items in self.partitions.values() if items)
                return ((known or used < self.max_partitions)
                        and len(self.partitions.get(partition, ())) + len(values) <= self.max_items)

            if not room():
                if not block:
                    raise stdlib_queue.Full("Queue is full")
                try:
                    await asyncio.wait_for(self.changed().wait_for(room), timeout)
                except TimeoutError:
                    raise stdlib_queue.Full("Queue is full") from None
            self.partitions[partition].extend(values)
            self.ttls[partition] = partition_ttl
            self.changed().notify_all()
        await asyncio.sleep(half)

    async def _get(self, block: bool = True, timeout=None, *, partition=None):
        values = await self._get_many(1, block, timeout, partition=partition)
        return values[0] if values else None

    async def _get_many(self, n_values: int, block: bool = True, timeout=None, *,
                        partition=None) -> list:
        self.workspace.count("QueueGet")
        half = self.workspace.rpc / 2
        await asyncio.sleep(half)  # the request reaches the server
        items = self.partitions[partition]
        async with self.changed():
            if not block and not items:
                await asyncio.sleep(half)
                return []
            try:
                await asyncio.wait_for(self.changed().wait_for(lambda: bool(items)), timeout)
            except TimeoutError:
                raise stdlib_queue.Empty() from None  # as modal.Queue.get documents
            values = [items.popleft() for _ in range(min(n_values, len(items)))]
        await asyncio.sleep(half)  # the answer comes back
        return values


class _AsyncOp:
    def __init__(self, fn):
        self.aio = fn


# ## Function calls


@dataclasses.dataclass(eq=False)
class Input:
    """One function input: its result, and for a generator the items the server holds."""

    method: str
    args: tuple
    generator: bool
    submitted: float = dataclasses.field(default_factory=time.monotonic)
    result: asyncio.Future = dataclasses.field(default_factory=asyncio.Future)
    items: list = dataclasses.field(default_factory=list)  # (visible at, item) on the server
    sent_all: bool = False  # the generator ended and its last batch reached the server
    task: asyncio.Task | None = None
    container: Container | None = None
    timed_out: bool = False
    cancelled: bool = False

    def finish(self, value=None, error: BaseException | None = None) -> None:
        if self.result.done():
            return
        if error is not None:
            self.result.set_exception(error)
            self.result.exception()  # the caller may have left: no "never retrieved" warning
        else:
            self.result.set_result(value)


class Container:
    """One container of a pool: an instance of the user's class after its enter hooks."""

    def __init__(self, pool: Pool, instance):
        self.pool, self.instance = pool, instance
        self.started_at = time.monotonic()
        self.running: set[Input] = set()
        self.hooks = pool.hooks

    def next_heartbeat_in(self) -> float:
        beat = self.pool.workspace.heartbeat
        return beat - (time.monotonic() - self.started_at) % beat

    def start(self, inp: Input) -> None:
        inp.container = self
        self.running.add(inp)
        inp.task = asyncio.ensure_future(self._run(inp))
        if self.pool.timeout is not None:
            def time_out() -> None:
                if not inp.task.done():
                    inp.timed_out = True
                    inp.task.cancel()

            asyncio.get_running_loop().call_later(self.pool.timeout, time_out)

    async def _run(self, inp: Input) -> None:
        method = self.pool.methods[inp.method].raw_f.__get__(self.instance)
        sender = None
        try:
            if inp.generator:
                outbox: asyncio.Queue = asyncio.Queue()
                sender = asyncio.ensure_future(self._send_items(inp, outbox))
                async for item in method(*inp.args):
                    outbox.put_nowait(item)
                outbox.put_nowait(_END)
                await sender
                inp.finish()
            else:
                inp.finish(await method(*inp.args))
        except asyncio.CancelledError:
            if inp.timed_out:
                inp.finish(error=modal.exception.FunctionTimeoutError(
                    f"Function '{inp.method}' timed out after {self.pool.timeout} s"))
            else:  # cancelled: a TERMINATED result, no data
                inp.finish(error=modal.exception.RemoteError(""))
        except Exception as exc:  # noqa: BLE001 - the method's own exception reaches the caller
            inp.finish(error=exc)
        finally:
            if sender is not None and not sender.done():
                sender.cancel()
            inp.sent_all = True
            self.running.discard(inp)
            self.pool.slot_freed()

    async def _send_items(self, inp: Input, outbox: asyncio.Queue) -> None:
        """Batches of whatever is ready, one RPC at a time (generator_output_sender)."""
        half = self.pool.workspace.rpc / 2
        while True:
            batch = [await outbox.get()]
            while not outbox.empty():
                batch.append(outbox.get_nowait())
            ended = batch[-1] is _END
            batch = [item for item in batch if item is not _END]
            if batch:
                self.pool.workspace.count("FunctionCallPutDataOut")
                await asyncio.sleep(half)
                now = time.monotonic()
                inp.items.extend((now, item) for item in batch)
                self.pool.notify()
                await asyncio.sleep(half)
            if ended:
                return


_END = object()


class FunctionCall:
    """modal.FunctionCall, as `spawn` returns it."""

    def __init__(self, pool: Pool, inp: Input):
        self.pool, self.input = pool, inp
        self.get = _AsyncOp(self._get)
        self.cancel = _AsyncOp(self._cancel)

    async def _get(self, timeout: float | None = None):
        self.pool.workspace.count("FunctionGetOutputs")
        try:
            await asyncio.wait_for(asyncio.shield(self.input.result), timeout)
        except TimeoutError:
            raise TimeoutError() from None  # Python's, as _Invocation.poll_function raises
        await asyncio.sleep(self.pool.workspace.rpc / 2)
        return self.input.result.result()

    async def _cancel(self, terminate_containers: bool = False) -> None:
        await self.pool.workspace.round_trip("FunctionCallCancel")
        self.pool.cancel(self.input)


class Method:
    """A method of a pool instance, as the router holds it (a modal.Function)."""

    def __init__(self, pool: Pool, name: str):
        self.pool, self.name = pool, name
        self.generator = inspect.isasyncgenfunction(pool.methods[name].raw_f)
        self.remote = _AsyncOp(self._remote)
        self.remote_gen = _AsyncOp(self._remote_gen)
        self.spawn = _AsyncOp(self._spawn)
        self.get_current_stats = _AsyncOp(self._stats)

    async def _submit(self, args) -> Input:
        await self.pool.workspace.round_trip("FunctionMap")
        inp = Input(self.name, args, self.generator)
        self.pool.submit(inp)
        return inp

    async def _remote(self, *args):
        if self.generator:
            raise modal.exception.InvalidError(
                "A generator function cannot be called with `.remote(...)`.")
        inp = await self._submit(args)
        await asyncio.shield(inp.result)  # a cancelled caller only stops waiting
        await asyncio.sleep(self.pool.workspace.rpc / 2)
        return inp.result.result()

    async def _spawn(self, *args) -> FunctionCall:
        if self.generator:
            raise modal.exception.InvalidError("Cannot `spawn` a generator function.")
        return FunctionCall(self.pool, await self._submit(args))

    async def _remote_gen(self, *args):
        if not self.generator:
            raise modal.exception.InvalidError(
                "A non-generator function cannot be called with `.remote_gen(...)`.")
        inp = await self._submit(args)
        self.pool.readers += 1
        try:
            index = 0
            while True:
                await self.pool.wait_for(lambda i=index: i < len(inp.items) or inp.sent_all)
                if index < len(inp.items):
                    visible_at, item = inp.items[index]
                    index += 1
                    await asyncio.sleep(max(0.0, visible_at + self.pool.workspace.rpc / 2
                                            - time.monotonic()))
                    yield item
                    continue
                error = inp.result.exception() if inp.result.done() else None
                if error is not None:
                    raise error
                return
        finally:  # the consumer stopped (or the stream ended): only the reading stops
            self.pool.readers -= 1

    async def _stats(self) -> FunctionCurrentStats:
        await self.pool.workspace.round_trip("FunctionGetCurrentStats")
        running = sum(len(c.running) for c in self.pool.containers)
        return FunctionCurrentStats(len(self.pool.pending), len(self.pool.containers), running,
                                    self.pool.max_inputs * len(self.pool.containers) - running)


class _Instance:
    """`Cls()` on a deployed class: attributes are its methods."""

    def __init__(self, pool: Pool):
        self._methods = {name: Method(pool, name) for name in pool.methods}

    def __getattr__(self, name: str) -> Method:
        try:
            return self._methods[name]
        except KeyError:
            raise AttributeError(name) from None


class Pool:
    """A deployed `modal.Cls` of one model's GPU pool: containers start on demand (their
    enter hooks run first), take `max_inputs` inputs each, at most `max_containers`."""

    def __init__(self, workspace: Workspace, user_cls: type, *, max_inputs: int = 32,
                 max_containers: int = 1, timeout: float | None = None):
        self.workspace, self.user_cls = workspace, user_cls
        self.max_inputs, self.max_containers, self.timeout = max_inputs, max_containers, timeout
        self.methods = _find_partial_methods_for_user_cls(user_cls, Flags.interface_flags())
        self.hooks = {when: list(_find_partial_methods_for_user_cls(user_cls, flag).values())
                      for when, flag in (("pre", Flags.ENTER_PRE_SNAPSHOT),
                                         ("post", Flags.ENTER_POST_SNAPSHOT),
                                         ("exit", Flags.EXIT))}
        self.containers: list[Container] = []
        self.pending: collections.deque[Input] = collections.deque()
        self.inputs: list[Input] = []  # every input ever submitted
        self.boots = 0  # containers started, failed ones included
        self.boot_errors: list[BaseException] = []
        self.readers = 0  # `.remote_gen` consumers still reading
        self._dispatcher: asyncio.Task | None = None
        self._changed: asyncio.Condition | None = None

    def __call__(self) -> _Instance:
        return _Instance(self)

    def changed(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    def notify(self) -> None:
        async def wake() -> None:
            async with self.changed():
                self.changed().notify_all()

        asyncio.ensure_future(wake())

    async def wait_for(self, predicate) -> None:
        async with self.changed():
            await self.changed().wait_for(predicate)

    def submit(self, inp: Input) -> None:
        self.inputs.append(inp)
        self.pending.append(inp)
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.ensure_future(self._dispatch())

    def slot_freed(self) -> None:
        self.notify()

    def cancel(self, inp: Input) -> None:
        inp.cancelled = True
        if inp in self.pending:  # never started: it never runs
            self.pending.remove(inp)
            inp.finish(error=modal.exception.RemoteError(""))
            inp.sent_all = True
            self.notify()
            return
        if inp.task is not None and not inp.task.done():
            # The container learns of it with its next heartbeat.
            asyncio.get_running_loop().call_later(inp.container.next_heartbeat_in(),
                                                  inp.task.cancel)

    def running(self) -> int:
        return sum(len(c.running) for c in self.containers)

    async def _dispatch(self) -> None:
        while self.pending:
            free = [c for c in self.containers if len(c.running) < self.max_inputs]
            if not free and len(self.containers) < self.max_containers:
                container = await self._boot()
                if container is None:
                    continue  # Modal gave up; the waiting inputs have failed
                free = [container]
            if not free:
                await self.wait_for(lambda: any(len(c.running) < self.max_inputs
                                                for c in self.containers))
                continue
            if self.pending:
                free[0].start(self.pending.popleft())

    async def _boot(self) -> Container | None:
        """Start a container; a failing enter hook crash-loops until Modal gives up."""
        last = None
        for attempt in range(self.workspace.boot_attempts):
            if attempt:
                await asyncio.sleep(self.workspace.restart_delay)
                if not self.pending:  # nothing waits any more: no reason to start another
                    return None
            self.boots += 1
            instance = self.user_cls()
            try:
                await asyncio.to_thread(self._enter, instance)
            except Exception as exc:  # noqa: BLE001 - the container exits; Modal starts another
                self.boot_errors.append(exc)
                last = exc
                continue
            container = Container(self, instance)
            self.containers.append(container)
            return container
        while self.pending:
            inp = self.pending.popleft()
            inp.finish(error=last)
            inp.sent_all = True
        self.notify()
        return None

    def _enter(self, instance) -> None:
        for hook in self.hooks["pre"] + self.hooks["post"]:
            hook.raw_f.__get__(instance)()

    async def shutdown(self) -> None:
        """Stop every container as Modal does: running inputs end, then the exit hooks."""
        for container in self.containers:
            for inp in list(container.running):
                inp.task.cancel()
            for inp in list(container.running):
                await asyncio.gather(inp.task, return_exceptions=True)
            for hook in self.hooks["exit"]:
                await asyncio.to_thread(hook.raw_f.__get__(container.instance))
            backend = getattr(container.instance, "backend", None)
            if backend is not None:
                await backend.aclose()
        self.containers.clear()
        if self._dispatcher is not None:
            self._dispatcher.cancel()


class Workspace:
    """A Modal workspace: its Dicts and Queues by name, its pools, and the RPCs made."""

    def __init__(self, *, rpc: float = 0.0, heartbeat: float = HEARTBEAT_INTERVAL,
                 boot_attempts: int = 3, restart_delay: float = 0.0):
        self.rpc = rpc  # seconds per RPC, there and back
        self.heartbeat = heartbeat  # how often a container learns of cancellations
        self.boot_attempts = boot_attempts  # failed container starts before Modal gives up
        self.restart_delay = restart_delay  # between two containers of a crash loop
        self.dicts: dict[str, FakeDict] = {}
        self.queues: dict[str, FakeQueue] = {}
        self.pools: list[Pool] = []
        self.rpcs: collections.Counter = collections.Counter()
        self._lock = threading.Lock()

    def count(self, name: str) -> None:
        with self._lock:
            self.rpcs[name] += 1

    async def round_trip(self, name: str) -> None:
        self.count(name)
        await asyncio.sleep(self.rpc)

    def dict_from_name(self, name: str, *, environment_name=None, create_if_missing=False,
                       client=None) -> FakeDict:
        return self._named(self.dicts, FakeDict, name, create_if_missing)

    def queue_from_name(self, name: str, *, environment_name=None, create_if_missing=False,
                        client=None) -> FakeQueue:
        return self._named(self.queues, FakeQueue, name, create_if_missing)

    def _named(self, store: dict, kind: type, name: str, create_if_missing: bool):
        """`from_name`: the named object, made if asked, else NotFoundError as Modal raises."""
        if name not in store:
            if not create_if_missing:
                raise modal.exception.NotFoundError(
                    f"{kind.__name__.removeprefix('Fake')} '{name}' not found")
            store[name] = kind(self)
        return store[name]

    def patch(self, monkeypatch) -> Workspace:
        monkeypatch.setattr(modal.Dict, "from_name", staticmethod(self.dict_from_name))
        monkeypatch.setattr(modal.Queue, "from_name", staticmethod(self.queue_from_name))
        return self

    def pool(self, user_cls: type, **options: Any) -> Pool:
        pool = Pool(self, user_cls, **options)
        self.pools.append(pool)
        return pool

    async def shutdown(self) -> None:
        for pool in self.pools:
            await pool.shutdown()


# ## The project's pools on these fakes: the real pool class, with a stand-in for vLLM


class _RunningEngine:
    """What LocalEngine asks of an engine.Engine that is up (the stand-in server is)."""

    def running(self) -> bool:
        return True

    def log_tail(self) -> str:
        return ""

    def stop(self) -> None:
        pass


def engine_pool_class(app_plan, model_key: str, *, url: str = "", fail=None,
                      module: str = "tests_cold_path") -> type:
    """The project's pool class for one model (gpu_pool.pool_class: the real `request`,
    `stream`, enter hooks and failure reporting) whose `_boot` starts no vLLM: its engine is
    the stand-in at `url`, or it fails as a vLLM that cannot start does: `fail()` is asked
    at each start and returns the EngineError's message, or '' to start."""
    import config
    import engine
    import gpu_pool

    def boot(self, *, sleep_mode: bool) -> None:
        self.model = config.load().models[self.model_key]
        reason = fail() if fail is not None else ""
        if reason:
            raise engine.EngineError(reason)
        self.engine = _RunningEngine()
        self.backend = gpu_pool.LocalEngine(self.engine, self.model_key, url=url)

    pool = next(p for p in app_plan.pools if p.model.key == model_key)
    cls = gpu_pool.pool_class(pool, app_plan, module)
    return type(cls.__name__, (cls,), {"__module__": module, "_boot": boot})


def fake_nvidia_smi(directory, monkeypatch, lines: str = "NVIDIA H100 80GB HBM3, 580.82.07") -> None:
    """An `nvidia-smi` on PATH that prints `lines` for --query-gpu=name,driver_version."""
    import os
    import sys

    script = directory / "nvidia-smi"
    script.write_text(f"#!{sys.executable}\nprint({lines!r})\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{directory}{os.pathsep}{os.environ.get('PATH', '')}")
