"""The gateway's own per-request cost, without any network: its ASGI app called
in-process with a backend that answers at once. What this measures is what the
gateway adds on Modal too, where Modal's web server (not uvicorn) carries the bytes.

    uv run python benchmarks/gateway_logic.py [--requests N]
"""

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import config
import gateway

KEY = "sk-bench-logic"
REPLY = {"id": "cmpl-1", "object": "chat.completion", "model": "google/gemma-3-12b-it",
         "choices": [{"index": 0, "finish_reason": "stop",
                      "message": {"role": "assistant", "content": "Hello! " * 20}}],
         "usage": {"prompt_tokens": 5, "completion_tokens": 20, "total_tokens": 25}}
RAW_REPLY = json.dumps(REPLY).encode()
BODY = json.dumps({"model": "gemma-3-12b", "max_tokens": 100,
                   "messages": [{"role": "user", "content": "Hello!"}]}).encode()
SCOPE = {"type": "http", "method": "POST", "path": "/v1/chat/completions",
         "headers": [(b"authorization", f"Bearer {KEY}".encode()),
                     (b"content-type", b"application/json"),
                     (b"content-length", str(len(BODY)).encode())]}


class InstantBackend:
    async def send(self, model, path, body, headers):
        return 200, RAW_REPLY

    def stream(self, model, path, body, headers):
        raise NotImplementedError


async def one(app) -> None:
    sent, incoming = [], [{"type": "http.request", "body": BODY, "more_body": False}]

    async def receive():
        if incoming:
            return incoming.pop()
        await asyncio.Event().wait()  # no disconnect: the request completes first

    async def send(message):
        sent.append(message)

    await app(SCOPE, receive, send)
    assert sent[0]["status"] == 200, sent
    # Let the loop run once, as a server's does between requests: the instant backend never
    # suspends, so without this each request's cancelled disconnect watcher stays pending,
    # 5000 a round piled up, and later rounds measured the pile (3x slower), not the gateway.
    await asyncio.sleep(0)


async def run(requests: int) -> list[float]:
    app = gateway.build_app(list(config.load().models.values()), InstantBackend(), api_key=KEY)
    for _ in range(500):  # warm-up
        await one(app)
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(requests):
            await one(app)
        rounds.append((time.perf_counter() - t0) / requests * 1e6)
    return rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    rounds = asyncio.run(run(parser.parse_args().requests))
    print(f"gateway logic: {statistics.median(rounds):.1f} us per request (median of 5 rounds; "
          f"min {min(rounds):.1f}, max {max(rounds):.1f})")


if __name__ == "__main__":
    main()
