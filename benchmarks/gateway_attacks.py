"""The attacks of issue 13 against `deploy.py --serve-local`, with what each cost the gateway.

    uv run python benchmarks/gateway_attacks.py            # ~1 min; prints a table
    uv run python benchmarks/gateway_attacks.py --unguarded  # the same, plain uvicorn (before)

Each attack runs against a fresh gateway process (in front of a stand-in, on loopback) while
an honest client sends one request every 50 ms; reported per attack: the gateway's peak RSS
(from /proc, VmHWM), the honest client's longest wait, and whether it was locked out.
`--unguarded` serves the same app under uvicorn's stock protocol: the server's share of
what the issue measured (the body rows hit the app's own bounds in both modes). Figures go
in README.md, "The gateway" (Limits).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import socket
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from servers import HOST, ProcessServer, free_port

KEY = "sk-attack-" + secrets.token_hex(12)
UNGUARDED = """
import os, sys, uvicorn
sys.path.insert(0, {root!r})
import config, gateway
m = config.load()
urls = {{k: {up!r} for k in m.models}}
app = gateway.build_app(list(m.models.values()), gateway.HTTPBackend(urls), api_key={key!r})
uvicorn.run(app, host="127.0.0.1", port={port}, log_level="critical", lifespan="on")
"""


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Honest:
    """One authenticated request every 50 ms; the longest wait and failures while it runs."""

    def __init__(self, port: int):
        self.url = f"http://{HOST}:{port}/v1/models"
        self.worst, self.failed, self.stop = 0.0, 0, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            t0 = time.perf_counter()
            try:
                httpx.get(self.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
            except httpx.HTTPError:
                self.failed += 1
            self.worst = max(self.worst, time.perf_counter() - t0)
            time.sleep(0.05)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=60)


def send_raw(port: int, data_chunks, pause: float = 0.0) -> None:
    with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=30) as s:
        for chunk in data_chunks:
            s.sendall(chunk)
            if pause:
                time.sleep(pause)
        s.settimeout(30)
        with contextlib.suppress(OSError):
            s.recv(65536)


def huge_headers(port: int) -> None:
    """Four connections, each 64 MiB of small headers, no key."""
    line = b"X-A: " + b"a" * 58 + b"\r\n"
    def one():
        send_raw(port, [b"GET /v1/models HTTP/1.1\r\n"] + [line * 16384] * 64)
    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def one_giant_header(port: int) -> None:
    """One 128 MiB header value."""
    send_raw(port, [b"GET /v1/models HTTP/1.1\r\nX-Big: "] + [b"a" * (1 << 20)] * 128)


def idle_flood(port: int, count: int = 1100, hold: float = 3.0) -> None:
    """Sockets that never send a byte, held open for `hold` seconds."""
    socks = []
    with contextlib.suppress(OSError):
        for _ in range(count):
            socks.append(socket.create_connection((HOST, port), timeout=5))
    time.sleep(hold)
    for s in socks:
        s.close()


def empty_arrays(port: int) -> None:
    """A 32 MiB body of `[],` under the body limit."""
    inner = b"[]," * ((32 * 1024 * 1024 - 200) // 3)
    body = b'{"model": "gemma-3-12b", "prompt": "x", "x": [' + inner + b"[]]}"
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    send_raw(port, [head, body])


def deep_json(port: int) -> None:
    body = b'{"model": "gemma-3-12b", "prompt": "x", "x": ' + b"[" * 970 + b"]" * 970 + b"}"
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    send_raw(port, [head + body])


def slowloris(port: int, count: int = 200, seconds: float = 12.0) -> None:
    """Connections sending their headers a byte per second, without a key."""
    def one():
        send_raw(port, [b"GET /v1/models HTTP/1.1\r\n"] + [b"X"] * int(seconds), pause=1.0)
    threads = [threading.Thread(target=one) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


ATTACKS = {"64 MiB headers x4": huge_headers, "one 128 MiB header": one_giant_header,
           "1100 idle sockets": idle_flood, "32 MiB of []": empty_arrays,
           "JSON 970 deep": deep_json, "slowloris x200": slowloris}


@contextlib.contextmanager
def gateway(standin_url: str, unguarded: bool, log):
    port = free_port()
    env = {**os.environ, "VLLM_API_KEY": KEY}
    # ulimit -n 1024, as in the idle-socket attack
    prefix = ["prlimit", "--nofile=1024:1024"] if shutil_which("prlimit") else []
    if unguarded:
        argv = [sys.executable, "-c", UNGUARDED.format(root=str(ROOT), up=standin_url, key=KEY,
                                                       port=port)]
    else:
        argv = [sys.executable, str(ROOT / "deploy.py"), "--serve-local", "--port", str(port),
                "--upstream", standin_url]
    with ProcessServer(prefix + argv, port, env=env, log=log) as server:
        yield server


def shutil_which(name: str) -> str | None:
    import shutil

    return shutil.which(name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--unguarded", action="store_true", help="plain uvicorn: the 'before'")
    p.add_argument("--only", choices=list(ATTACKS), action="append")
    a = p.parse_args()
    results = ROOT / "results"
    results.mkdir(exist_ok=True)
    standin_port = free_port()
    rows = []
    with (results / "gateway_attacks.log").open("w") as log, ProcessServer(
            [sys.executable, str(ROOT / "tests" / "standin.py"), "--port", str(standin_port),
             "--served-model-name", "google/gemma-3-12b-it", "google/gemma-3-27b-it",
             "Qwen/Qwen3-VL-30B-A3B-Instruct"], standin_port) as standin:
        for name, attack in ATTACKS.items():
            if a.only and name not in a.only:
                continue
            with gateway(standin.url, a.unguarded, log) as gw:
                pid = gw.proc.pid
                with Honest(gw.port) as honest:
                    time.sleep(0.3)
                    t0 = time.perf_counter()
                    attack(gw.port)
                    took = time.perf_counter() - t0
                    time.sleep(0.3)
                rows.append({"attack": name, "peak_rss_mb": round(peak_rss_mb(pid), 1),
                             "honest_worst_wait_s": round(honest.worst, 3),
                             "honest_failures": honest.failed, "attack_s": round(took, 1)})
                print(json.dumps(rows[-1]), flush=True)
    load = os.getloadavg()
    print(f"\n{'unguarded (plain uvicorn)' if a.unguarded else 'guarded'}; "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"{'attack':22} {'peak RSS MB':>12} {'honest worst wait s':>20} {'honest failures':>16}")
    for r in rows:
        print(f"{r['attack']:22} {r['peak_rss_mb']:12.1f} {r['honest_worst_wait_s']:20.3f} "
              f"{r['honest_failures']:16d}")
    name = "gateway_attacks_unguarded.json" if a.unguarded else "gateway_attacks.json"
    (results / name).write_text(json.dumps({"rows": rows, "load": load}, indent=2))


if __name__ == "__main__":
    main()
