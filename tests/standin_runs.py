"""Stand-in runs for the README's picture of the results page: `deploy.py --bench` for real,
through the real gateway, against tests/standin.py made slower or faster per GPU key. The
latencies are the stand-in's delays, not a GPU's; the costs are models.yaml's prices applied to
them. Then `deploy.py --report`, and optionally a screenshot in headless Chromium.

    uv run python tests/standin_runs.py results/standin --screenshot docs/report.png

About 40 s: five runs of 64 requests, 16 at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
from pathlib import Path

from servers import ThreadServer
from standin import StandIn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gateway  # the project's modules sit one folder up (inserted above)
from config import load

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-standin-runs-0123456789"
# gpu -> (seconds before the first token, seconds between tokens, every Nth request fails)
PACE = {"l40s": (0.40, 0.030, 0), "a100": (0.24, 0.020, 0), "h100": (0.13, 0.012, 0),
        "h200": (0.11, 0.010, 0), "b200": (0.07, 0.008, 8)}
TARGETS = ("--max-ttft-ms", "350", "--max-tpot-ms", "25")


class SomeFail:
    """Every `nth` completion answers 503 (as vLLM does while it cannot take a request)."""

    def __init__(self, app, nth: int):
        self.app, self.nth, self.seen = app, nth, 0

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/v1/completions" and self.nth:
            self.seen += 1
            if self.seen % self.nth == 0:
                await send({"type": "http.response.start", "status": 503,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": (
                    b'{"error": {"message": "stand-in: no free slot", "type": '
                    b'"ServiceUnavailableError", "param": null, "code": 503}}')})
                return
        await self.app(scope, receive, send)


def bench(results: Path, gpu: str) -> None:
    ttft, gap, nth = PACE[gpu]
    matrix = load()
    model = matrix.models["gemma-3-12b"]
    upstream = SomeFail(StandIn([model.name], delay=ttft, token_delay=gap), nth)
    with ThreadServer(upstream) as up, ThreadServer(gateway.build_app(
            [model], gateway.HTTPBackend({model.key: up.url}), api_key=KEY)) as gw:
        subprocess.run([sys.executable, str(ROOT / "deploy.py"), "--bench", gpu,
                        "--test-model", model.key, "--base-url", gw.url, "--api-key", KEY,
                        "--requests", "64", "--concurrency", "16", "--input-len", "256",
                        "--output-len", "64", "--results-dir", str(results), *TARGETS],
                       check=False, cwd=ROOT)


async def screenshot(page: Path, path: Path) -> None:
    from browser import Browser, find_chromium

    async with Browser(find_chromium()) as browser:
        await browser.open(page.resolve().as_uri(), width=1280, height=1120)
        await browser.screenshot(path, full=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--screenshot", type=Path)
    args = parser.parse_args()
    for gpu in PACE:
        bench(args.results, gpu)
    subprocess.run([sys.executable, str(ROOT / "deploy.py"), "--report", "--results-dir",
                    str(args.results)], check=True, cwd=ROOT)
    if args.screenshot:
        asyncio.run(screenshot(args.results / "report.html", args.screenshot))


if __name__ == "__main__":
    main()
