"""An emulator of Modal's web ingress in front of an ASGI app (an `@modal.asgi_app`).

What it does, and where each behaviour comes from:

- A request whose response has not started after `limit` seconds (150 on Modal) is
  answered `303 See Other` to a *result URL*, and the app runs on. The result URL "can be
  reloaded without triggering a new request. It will block until the request completes"
  (https://modal.com/docs/guide/webhook-timeouts); while it waits longer than `limit`
  again, it answers another 303 to itself. A response that has started streams on.
- The result URL is the request's own path with `?__modal_function_call_id=fc-...`, and
  it must be fetched with GET: a POST to it is refused with 400 and `modal-http: bad
  redirect method`. Modal's docs name neither; both are what users report from real
  endpoints, so they are assumptions here, and the README says so.
- Whether the app receives `http.disconnect` at the hand-off is not documented
  (modal/_runtime/asgi.py only relays what Modal's web server sends), so both variants:
  `disconnect_at_handoff=True` sends one, False sends nothing.
- A client that leaves before the hand-off: the app receives `http.disconnect`.
- The app's messages are relayed as modal/_runtime/asgi.py relays them; a response body
  that started goes to the client chunk by chunk.

It records the 303s it answered (`handoffs`) and the result fetches (`result_fetches`).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from urllib.parse import parse_qs

RESULT_PARAM = "__modal_function_call_id"


class _Call:
    """One web function call: the app's task, what it was sent, what it answered."""

    def __init__(self, call_id: str, body: bytes):
        self.id = call_id
        self.to_app: asyncio.Queue = asyncio.Queue()
        self.to_app.put_nowait({"type": "http.request", "body": body, "more_body": False})
        self.from_app: asyncio.Queue = asyncio.Queue()
        self.task: asyncio.Task | None = None
        self.started = time.monotonic()
        self.response: list[dict] = []  # once handed off: kept for the result URL
        self.complete = asyncio.Event()


class ModalIngress:
    def __init__(self, app, *, limit: float = 150.0, disconnect_at_handoff: bool = True,
                 on_shutdown=None):
        self.app, self.limit = app, limit
        self.disconnect_at_handoff = disconnect_at_handoff
        self.on_shutdown = on_shutdown  # an async callable, run after the app's shutdown
        self.calls: dict[str, _Call] = {}
        self.handoffs: list[str] = []  # paths answered with a 303
        self.result_fetches: list[str] = []  # methods of the requests to a result URL
        self._ids = itertools.count(1)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self.lifespan(scope, receive, send)
        if scope["type"] != "http":
            return
        query = parse_qs(scope.get("query_string", b"").decode())
        if RESULT_PARAM in query:
            return await self.result(query[RESULT_PARAM][0], scope, send)
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        call = _Call(f"fc-{next(self._ids):06d}", body)
        self.calls[call.id] = call
        call.task = asyncio.ensure_future(self.app(scope, call.to_app.get, call.from_app.put))
        call.task.add_done_callback(lambda _: call.from_app.put_nowait({"type": "_app.done"}))
        await self.answer(call, scope, receive, send)

    async def answer(self, call: _Call, scope, receive, send) -> None:
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            first = asyncio.ensure_future(call.from_app.get())
            done, _ = await asyncio.wait((first, gone), timeout=self.limit,
                                         return_when=asyncio.FIRST_COMPLETED)
            if gone in done:  # the client left before any answer: the app hears of it
                first.cancel()
                await call.to_app.put({"type": "http.disconnect"})
                return
            if first not in done:  # the hand-off: a 303, and the call runs on
                first.cancel()
                self.handoffs.append(scope["path"])
                if self.disconnect_at_handoff:
                    await call.to_app.put({"type": "http.disconnect"})
                asyncio.ensure_future(self._keep(call))
                location = f"{scope['path']}?{RESULT_PARAM}={call.id}".encode()
                await send({"type": "http.response.start", "status": 303,
                            "headers": [(b"location", location), (b"content-length", b"0")]})
                await send({"type": "http.response.body", "body": b""})
                return
            message = first.result()
            while True:  # relay as it comes, until the body ends or the client leaves
                if message["type"] == "_app.done":
                    if not call.task.cancelled() and call.task.exception() is not None:
                        await _plain(send, 500, b"internal server error")
                    return
                await send(message)
                if message["type"] == "http.response.body" and not message.get("more_body"):
                    return
                next_message = asyncio.ensure_future(call.from_app.get())
                done, _ = await asyncio.wait((next_message, gone),
                                             return_when=asyncio.FIRST_COMPLETED)
                if next_message not in done:
                    next_message.cancel()
                    await call.to_app.put({"type": "http.disconnect"})
                    return
                message = next_message.result()
        finally:
            gone.cancel()

    async def _keep(self, call: _Call) -> None:
        """After the hand-off: keep the whole answer for the result URL."""
        while True:
            message = await call.from_app.get()
            if message["type"] == "_app.done":
                if not call.response and not call.task.cancelled() and \
                        call.task.exception() is not None:
                    call.response = [
                        {"type": "http.response.start", "status": 500, "headers": []},
                        {"type": "http.response.body", "body": b"internal server error"}]
                break
            call.response.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                break
        call.complete.set()

    async def result(self, call_id: str, scope, send) -> None:
        self.result_fetches.append(scope["method"])
        call = self.calls.get(call_id)
        if call is None:
            return await _plain(send, 404, b"unknown function call")
        if scope["method"] != "GET":
            return await _plain(send, 400, b"modal-http: bad redirect method")
        try:
            await asyncio.wait_for(call.complete.wait(), self.limit)
        except TimeoutError:  # still running: another 303 to the same result URL
            self.handoffs.append(scope["path"])
            location = f"{scope['path']}?{RESULT_PARAM}={call.id}".encode()
            await send({"type": "http.response.start", "status": 303,
                        "headers": [(b"location", location), (b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        for message in call.response:
            await send(message)

    async def lifespan(self, scope, receive, send) -> None:
        async def send_after_cleanup(message) -> None:
            if message["type"] == "lifespan.shutdown.complete" and self.on_shutdown is not None:
                await self.on_shutdown()
            await send(message)

        await self.app(scope, receive, send_after_cleanup)


async def _disconnected(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _plain(send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain"),
                            (b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})
