"""The router's backend: a gateway Backend that calls each model's GPU pool across Modal.

Non-streamed requests are spawned (`Function.spawn`), so that a client who leaves before
Modal's hand-off can cancel the call (`FunctionCall.cancel`): the pool's input task is
cancelled, which closes its connection to vLLM, which aborts the generation and frees the
slot. `.remote` could not do it: a cancelled caller only stops waiting, and only
`FunctionCall.cancel` sends FunctionCallCancel (modal/_functions.py). A cancellation
reaches the container with its next heartbeat, at most 15 s later
(modal/_runtime/container_io_manager.py, _run_heartbeat_loop; `heartbeat_interval` in
modal/config.py).

Streams use `.remote_gen` (`_Function.spawn` refuses a generator) with a stream id; when
the client leaves, the router puts a mark in that id's Queue partition, on which the pool
is waiting (pool_state.CancelMarks). Closing the generator alone would leave the pool
generating to max_tokens.

A call still waiting after pool_state.SLOW_CALL_SECONDS consults the pool's failure record,
then every CHECK_EVERY_SECONDS: a fresh one answers 503 with the reason and cancels the
call, and later requests get that 503 at once, without a call, until the record is stale.
A healthy pool costs no look-up. After `deadline` seconds without an answer: 504.

Every answer carries Server-Timing `pool` (spawn to answer: queueing and any cold start
included) beside the pool's own `engine` entry and GPU header.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable

import modal

import config
import engine
import pool_state
from gateway import BackendError

log = logging.getLogger("router")


def pool_failure(exc: BaseException) -> BackendError:
    """What a Modal call raised, as the gateway's 502 / 503 / 504."""
    errors = modal.exception
    if isinstance(exc, engine.EngineError):
        # A crash loop that Modal escalated to the waiting inputs: they receive the start-up
        # exception itself (modal/_utils/function_utils.py, _process_result).
        return BackendError(503, f"model engine failed to start: {pool_state.headline(exc)}",
                            retry_after=30)
    if isinstance(exc, errors.TimeoutError | TimeoutError):
        # FunctionTimeoutError (the pool's own timeout) and OutputExpiredError derive from
        # modal.exception.TimeoutError, which is not Python's TimeoutError;
        # FunctionCall.get(timeout=) raises Python's.
        return BackendError(504, "model pool timed out")
    if isinstance(exc, errors.InternalFailure | errors.ConnectionError | errors.ServiceError
                  | errors.InternalError | errors.ResourceExhaustedError):
        # Modal lost the input (a preempted worker), cannot be reached, or is at a limit.
        return BackendError(503, f"Modal could not run the request ({type(exc).__name__}); "
                                 "retry", retry_after=10)
    if isinstance(exc, errors.RemoteError):
        # A failed result with no exception in it: a container that crashed or was killed
        # (out of memory), or a call terminated by someone else (the app was stopped).
        return BackendError(502, f"model pool failed ({pool_state.headline(exc)})")
    return BackendError(502, f"model pool failed ({type(exc).__name__})")


def _error_message(body: bytes) -> str:
    """The message of the OpenAI-shaped error body a pool answers with."""
    return json.loads(body)["error"]["message"]


def _failed(record: dict) -> BackendError:
    message, retry_after = pool_state.describe(record)
    return BackendError(503, message, retry_after=retry_after)


class ModalBackend:
    """Calls each model's pool: a spawned method call, or a generator call for streams."""

    def __init__(self, pools: dict[str, modal.Cls], *, deadline: float | None = None,
                 failures: pool_state.FailureWatch | None = None,
                 cancel_marks: pool_state.CancelMarks | None = None):
        self._pools = pools
        self._instances: dict[str, object] = {}
        self.deadline = deadline  # seconds to wait for a pool's answer (None: no limit)
        self.failures = failures  # None: no fail-fast (tests, or a pool that reports nothing)
        self.cancel_marks = cancel_marks or pool_state.CancelMarks()
        self._background: set[asyncio.Task] = set()  # cancellations in flight

    def _pool(self, model: config.Model):
        if model.key not in self._instances:
            self._instances[model.key] = self._pools[model.key]()
        return self._instances[model.key]

    def _in_background(self, coro, what: str) -> None:
        """Undo a call without making the leaving client's task wait for Modal."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)

        def done(t: asyncio.Task) -> None:
            self._background.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.warning("%s failed: %s", what, type(t.exception()).__name__)

        task.add_done_callback(done)

    def _cancel(self, call) -> None:
        self._in_background(call.cancel.aio(), "cancelling a pool call")

    def _refuse_if_failed(self, model: config.Model) -> None:
        record = self.failures.known(model.key) if self.failures else None
        if record is not None:
            raise _failed(record)

    async def _wait(self, model: config.Model, answer: asyncio.Future,
                    abandon: Callable[[], None]):
        """The pool's answer; meanwhile, once slow, its failure record, and the deadline.
        Whatever ends the wait early (503, 504, the client leaving) also `abandon`s the call."""
        started = time.monotonic()
        check_at = pool_state.SLOW_CALL_SECONDS if self.failures else None
        try:
            while True:
                until = [t for t in (check_at, self.deadline) if t is not None]
                timeout = max(0.0, started + min(until) - time.monotonic()) if until else None
                done, _ = await asyncio.wait((answer,), timeout=timeout)
                if done:
                    return answer.result()
                elapsed = time.monotonic() - started
                if self.deadline is not None and elapsed >= self.deadline:
                    raise BackendError(504, f"model pool gave no answer within {self.deadline:g} "
                                            "s (queued for a GPU, starting, or generating)")
                record = await self.failures.check(model.key)
                if answer.done():
                    return answer.result()
                if record is not None:
                    raise _failed(record)
                check_at = elapsed + pool_state.CHECK_EVERY_SECONDS
        except BaseException:
            if not answer.done():
                answer.cancel()
                with contextlib.suppress(BaseException):
                    await answer  # let it unwind before the call is abandoned
                abandon()
            raise

    async def _spawn(self, method, *args):
        spawning = asyncio.ensure_future(method.spawn.aio(*args))
        try:
            return await asyncio.shield(spawning)
        except asyncio.CancelledError:
            # The client left while the call was being created: cancel it once it exists.
            def cancel_when_created(t: asyncio.Future) -> None:
                if not t.cancelled() and t.exception() is None:
                    self._cancel(t.result())

            spawning.add_done_callback(cancel_when_created)
            raise

    async def send(self, model: config.Model, path: str, body: bytes,
                   headers: list | None = None) -> tuple[int, bytes]:
        self._refuse_if_failed(model)
        started = time.perf_counter()
        try:
            call = await self._spawn(self._pool(model).request, path, body)
            answer = asyncio.ensure_future(call.get.aio())
            status, payload, pool_headers = await self._wait(model, answer,
                                                             lambda: self._cancel(call))
        except BackendError:
            raise
        except Exception as exc:  # every failure becomes an HTTP error
            raise pool_failure(exc) from exc
        if self.failures is not None:
            self.failures.pool_answered(model.key)
        if headers is not None:
            headers += [*pool_headers, pool_state.server_timing("pool", started)]
        if status >= 500:  # the pool's engine failed: the gateway adds Retry-After to a 503
            raise BackendError(status, _error_message(payload))
        return status, payload

    def _mark_cancelled(self, stream_id: str) -> None:
        self._in_background(self.cancel_marks.mark(stream_id), "marking a stream cancelled")

    async def stream(self, model: config.Model, path: str, body: bytes,
                     headers: list | None = None) -> AsyncIterator[bytes]:
        self._refuse_if_failed(model)
        started = time.perf_counter()
        stream_id = os.urandom(16).hex()  # a Queue partition key: at most 64 characters
        chunks = self._pool(model).stream.remote_gen.aio(path, body, stream_id)
        finished = False  # the pool's generator ended: nothing to stop
        try:
            try:
                first = asyncio.ensure_future(anext(chunks))
                status, pool_headers = await self._wait(model, first, lambda: None)
                if self.failures is not None:
                    self.failures.pool_answered(model.key)
                if status != 200:
                    error = await anext(chunks)
                    finished = True
                    raise BackendError(status, _error_message(error))
            except BackendError:
                raise
            except StopAsyncIteration:
                finished = True
                raise BackendError(502, f"model pool for '{model.name}' sent an empty stream") \
                    from None
            except Exception as exc:
                finished = True
                raise pool_failure(exc) from exc
            if headers is not None:
                headers += [*pool_headers, pool_state.server_timing("pool", started)]
            try:
                async for chunk in chunks:
                    yield chunk
            except Exception as exc:  # the gateway ends the stream with an error event
                finished = True
                raise BackendError(pool_failure(exc).status, "model pool failed mid-stream: "
                                   f"{pool_state.headline(exc)}") from exc
            finished = True
        finally:
            if not finished:  # the client left, or the router gave up: stop the generation
                self._mark_cancelled(stream_id)
            with contextlib.suppress(RuntimeError):  # already closed by a cancelled read
                await chunks.aclose()

    async def aclose(self) -> None:
        """On shutdown, let the cancellations in flight reach Modal."""
        if self._background:
            await asyncio.wait(set(self._background), timeout=10)
