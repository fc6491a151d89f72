"""Headless Chromium (Debian's package, never a downloaded build) driven over the Chrome
DevTools Protocol, through aiohttp's websocket client (already a dependency).

It records what a page does that a person would not see: console errors, uncaught
exceptions, and every request the page makes (the Network domain's requestWillBeSent,
file:// and data: included). CDP methods used here, as Chromium documents them:
Page.navigate / loadEventFired / captureScreenshot, Runtime.evaluate / consoleAPICalled /
exceptionThrown, Log.entryAdded, Network.requestWillBeSent, Emulation.setDeviceMetricsOverride
and setEmulatedMedia (prefers-color-scheme).

Chromium is started with the flags this closed network needs (no background networking,
component updates, sync or QUIC) and a fresh profile, and always stopped (its whole process
group: the one started here).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Self

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-extensions",
                  "--disable-default-apps", "--no-default-browser-check", "--mute-audio",
                  "--hide-scrollbars", "--disable-dev-shm-usage", "--force-device-scale-factor=1",
                  "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0")


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


class Browser:
    """`async with Browser() as page:` a started Chromium and a CDP session on its first tab."""

    def __init__(self, executable: str, *, start_timeout: float = 60.0):
        self.executable = executable
        self.start_timeout = start_timeout
        self.events: list[dict] = []
        self._ids = iter(range(1, 1 << 30))
        self._waiting: dict[int, asyncio.Future] = {}

    def _start(self) -> None:
        self.profile = tempfile.mkdtemp(prefix="report-chromium-")
        self.proc = subprocess.Popen([self.executable, *CHROMIUM_FLAGS,
                                      f"--user-data-dir={self.profile}", "about:blank"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True)

    async def __aenter__(self) -> Self:
        import aiohttp

        self._start()  # a new process group of its own: stopping it stops its helpers too
        try:
            port = await self._port()
            self.http = aiohttp.ClientSession()
            async with self.http.get(f"http://127.0.0.1:{port}/json/list") as resp:
                targets = await resp.json()
            page = next(t for t in targets if t.get("type") == "page")
            self.ws = await self.http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
            self.reader = asyncio.ensure_future(self._read())
            for domain in ("Page", "Runtime", "Log", "Network"):
                await self.send(f"{domain}.enable")
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def _port(self) -> int:
        """Chromium writes its DevTools port into the profile once it listens."""
        marker = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}: "
                                   f"{self.proc.stderr.read().decode(errors='replace')[-2000:]}")
            if marker.exists() and marker.read_text().strip():
                return int(marker.read_text().split()[0])
            await asyncio.sleep(0.05)
        raise TimeoutError(f"chromium did not open its DevTools port in {self.start_timeout}s")

    async def __aexit__(self, *exc) -> None:
        for closing in (getattr(self, "reader", None),):
            if closing is not None:
                closing.cancel()
        if getattr(self, "ws", None) is not None:
            await self.ws.close()
        if getattr(self, "http", None) is not None:
            await self.http.close()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc.stderr.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    async def _read(self) -> None:
        async for message in self.ws:
            data = json.loads(message.data)
            if "id" in data:
                waiter = self._waiting.pop(data["id"], None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(data)
            else:
                self.events.append(data)

    async def send(self, method: str, timeout: float = 60.0, **params) -> dict:
        call_id = next(self._ids)
        self._waiting[call_id] = waiter = asyncio.get_running_loop().create_future()
        await self.ws.send_str(json.dumps({"id": call_id, "method": method, "params": params}))
        answer = await asyncio.wait_for(waiter, timeout)
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return answer.get("result", {})

    async def evaluate(self, expression: str):
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                                 awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:60]}...: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def open(self, url: str, *, width: int, height: int = 900, dark: bool = False,
                   ready: str = "document.body && document.body.dataset.ready === 'true'",
                   timeout: float = 60.0) -> None:
        """Load `url` at this viewport and colour scheme; wait for its load event and `ready`."""
        await self.viewport(width, height, dark=dark)
        loads = sum(1 for e in self.events if e["method"] == "Page.loadEventFired")
        await self.send("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            loaded = sum(1 for e in self.events if e["method"] == "Page.loadEventFired") > loads
            if loaded and await self.evaluate(f"Boolean({ready})"):
                return
            await asyncio.sleep(0.05)
        raise TimeoutError(f"{url} was not ready after {timeout}s")

    async def viewport(self, width: int, height: int = 900, *, dark: bool = False) -> None:
        await self.send("Emulation.setDeviceMetricsOverride", width=width, height=height,
                        deviceScaleFactor=1, mobile=False)
        await self.send("Emulation.setEmulatedMedia", features=[
            {"name": "prefers-color-scheme", "value": "dark" if dark else "light"}])

    async def screenshot(self, path: Path, *, full: bool = True) -> None:
        """The whole page (or only the viewport: `full=False`)."""
        shot = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=full)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))

    def console_errors(self) -> list[str]:
        found = []
        for e in self.events:
            p = e.get("params", {})
            if e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                found.append(" ".join(str(a.get("value", a.get("description", "")))
                                      for a in p.get("args", [])))
            elif e["method"] == "Runtime.exceptionThrown":
                found.append(json.dumps(p.get("exceptionDetails", {}))[:500])
            elif e["method"] == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                found.append(p["entry"].get("text", ""))
        return found

    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events
                if e["method"] == "Network.requestWillBeSent"]
