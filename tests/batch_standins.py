"""Stand-ins for batch runs, wrapping tests/standin.py's vLLM stand-in (not changing it).

`Failing` answers some requests as a troubled server does, chosen by a word in the
request's prompt, and passes every other request to the stand-in:

    status-400   a 400 in vLLM's error shape (a request vLLM refuses is answered, not retried)
    flaky-N      503 (vLLM's "starting" answer) to the first N sends of this prompt, then OK
    always-503   503 to every send: the request never gets an answer
    not-json     200 with an HTML body, as a misconfigured proxy in front of vLLM answers
"""

from __future__ import annotations

import json
import re
from collections import Counter

from standin import StandIn, _error


def _prompt(body) -> str:
    if not isinstance(body, dict):
        return ""
    if isinstance(body.get("prompt"), str):
        return body["prompt"]
    messages = body.get("messages") or [{}]
    content = messages[-1].get("content") if isinstance(messages[-1], dict) else ""
    return content if isinstance(content, str) else ""


class Failing:
    def __init__(self, inner: StandIn):
        self.inner = inner
        self.sends: Counter[str] = Counter()  # prompt -> times it was received

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in ("/v1/chat/completions",
                                                            "/v1/completions"):
            return await self.inner(scope, receive, send)
        raw, more = b"", True
        while more:
            message = await receive()
            raw += message.get("body", b"")
            more = message.get("more_body", False)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        prompt = _prompt(body)
        self.sends[prompt] += 1
        flaky = re.search(r"flaky-(\d+)", prompt)
        if "status-400" in prompt:
            return await self._json(send, *_error(400, "this request is refused on purpose"))
        if "always-503" in prompt or (flaky and self.sends[prompt] <= int(flaky[1])):
            return await self._json(send, *_error(503, "the server is starting",
                                                  "ServiceUnavailableError"))
        if "not-json" in prompt:
            return await self._raw(send, 200, b"<html>Bad gateway</html>", b"text/html")
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        await self.inner(scope, replay, send)

    @staticmethod
    async def _raw(send, status: int, data: bytes, ctype: bytes) -> None:
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", ctype), (b"content-length", b"%d" % len(data))]})
        await send({"type": "http.response.body", "body": data})

    async def _json(self, send, status: int, obj) -> None:
        await self._raw(send, status, json.dumps(obj).encode(), b"application/json")


class Forgetful:
    """The stand-in without its record of requests: for runs of a million requests, where
    that record would take gigabytes (benchmarks/batch_memory.py)."""

    def __init__(self, inner: StandIn):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        try:
            await self.inner(scope, receive, send)
        finally:
            self.inner.received.clear()


def main(argv=None) -> None:
    import argparse

    import uvicorn

    p = argparse.ArgumentParser(description="the vLLM stand-in, as a process, for batch runs")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--served-model-name", nargs="+", default=["google/gemma-3-12b-it"])
    p.add_argument("--forgetful", action="store_true", help="keep no record of requests")
    a = p.parse_args(argv)
    app = StandIn(a.served_model_name)
    app = Forgetful(app) if a.forgetful else app
    uvicorn.run(app, host="127.0.0.1", port=a.port, log_level="critical", access_log=False,
                server_header=False, date_header=False)


if __name__ == "__main__":
    main()
