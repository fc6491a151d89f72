"""Peak memory of `deploy.py --batch` for 100k and 1M-line input files: the file check alone
(`--dry-run`), a whole run against the vLLM stand-in, and a resume with everything already
answered (the output read back). Each command runs in its own process; its peak resident
set size (ru_maxrss) is what is reported.

    uv run python benchmarks/batch_memory.py                    # 100k and 1M lines (~15 min)
    uv run python benchmarks/batch_memory.py --lines 10000      # a quick look

The lines are eval-like chat requests of about 200 bytes. The run goes straight to the
stand-in (a plain OpenAI-compatible endpoint, as `--base-url` allows): the gateway is not
what is measured here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from servers import ProcessServer, free_port

KEY = "sk-memory-bench-0123456789"


def write_input(path: Path, n: int) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({
            "custom_id": f"eval-{i:08d}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "google/gemma-3-12b-it", "max_tokens": 16, "temperature": 0,
                     "messages": [{"role": "user", "content": f"Question {i}: what is {i} + "
                                                              f"{i}? Answer with a number."}]}})
            + "\n" for i in range(n))


def peak(args: list[str], cwd: Path) -> tuple[float, float, int]:
    """(peak RSS in MiB, seconds, exit code) of one command in its own child process."""
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
             "time.perf_counter() - t, code)")
    out = subprocess.run([sys.executable, "-c", probe, *args], cwd=cwd, capture_output=True,
                         text=True, check=True, env={**os.environ, "VLLM_API_KEY": KEY})
    kib, seconds, code = out.stdout.split()
    return int(kib) / 1024, float(seconds), int(code)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lines", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--results", type=Path, default=ROOT / "results" / "batch-memory")
    a = p.parse_args()
    a.results.mkdir(parents=True, exist_ok=True)
    deploy = [sys.executable, str(ROOT / "deploy.py"), "--batch", "h100"]
    port = free_port()
    rows = []
    with contextlib.ExitStack() as stack:
        up = stack.enter_context(ProcessServer(
            [sys.executable, str(ROOT / "tests" / "batch_standins.py"), "--port", str(port),
             "--forgetful"], port))
        tiny = a.results / "tiny.jsonl"
        write_input(tiny, 10)
        (a.results / "tiny.output.jsonl").unlink(missing_ok=True)
        base_check = peak([*deploy, "--input", str(tiny), "--dry-run"], a.results)
        base_run = peak([*deploy, "--input", str(tiny), "--base-url", up.url], a.results)
        print(f"baseline (10 lines): check {base_check[0]:.0f} MiB, run {base_run[0]:.0f} MiB",
              flush=True)
        for n in a.lines:
            path = a.results / f"lines-{n}.jsonl"
            write_input(path, n)
            output = a.results / f"lines-{n}.output.jsonl"
            output.unlink(missing_ok=True)
            size = path.stat().st_size / 2**20
            check = peak([*deploy, "--input", str(path), "--dry-run"], a.results)
            started = time.perf_counter()
            run = peak([*deploy, "--input", str(path), "--base-url", up.url, "--concurrency",
                        str(a.concurrency)], a.results)
            took = time.perf_counter() - started
            with open(output, "rb") as f:
                answered = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
            resume = peak([*deploy, "--input", str(path), "--base-url", up.url], a.results)
            rows.append({"lines": n, "input_mib": round(size, 1), "check_mib": check[0],
                         "check_s": check[1], "run_mib": run[0], "run_s": took,
                         "run_exit": run[2], "answered": answered, "resume_mib": resume[0],
                         "resume_s": resume[1]})
            print(f"{n:>9} lines ({size:.0f} MiB): check {check[0]:.0f} MiB in {check[1]:.1f} s; "
                  f"run {run[0]:.0f} MiB in {took:.0f} s ({answered} answered, exit {run[2]}); "
                  f"resume with all answered {resume[0]:.0f} MiB in {resume[1]:.1f} s",
                  flush=True)
            path.unlink()
            output.unlink()
    print(f"load average {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs); "
          f"max RSS of this script {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} "
          "MiB")
    (a.results / "batch_memory.json").write_text(json.dumps(
        {"baseline": {"check_mib": base_check[0], "run_mib": base_run[0]}, "rows": rows},
        indent=2))


if __name__ == "__main__":
    main()
