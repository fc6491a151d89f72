"""How long the offline commands take to start, against `python -c "import modal"`.

    uv run benchmarks/cli_startup.py            # 15 interleaved rounds, prints a table
    uv run benchmarks/cli_startup.py --check    # exit 1 when a target is missed

Each round runs every command once, in the same order (A B C D, A B C D, ...), so
that a noisy neighbour on a shared machine slows all of them alike. A warm-up
round first fills the validated-matrix cache and the bytecode caches, as any
second run on a user's machine finds them. Wall time per run is measured with
time.perf_counter around the whole child process; the interpreter is this one
(the project's venv under `uv run`), never `uv run` itself, whose own start-up
is not ours to measure.

The warm-up lets Python write its bytecode (.pyc) caches even where
PYTHONDONTWRITEBYTECODE is set, as a user's first run does by default: without
them every module is compiled on every run, which slows every command (`import
modal` included) two to three times and measures the compiler, not the code.

Targets: `deploy.py --list` median under 0.3 s, and at most a third of the
median `import modal` (the cost every command would pay if it imported modal).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = str(ROOT / "deploy.py")
COMMANDS = {
    "deploy.py --list": [sys.executable, DEPLOY, "--list"],
    "deploy.py --all --dry-run": [sys.executable, DEPLOY, "--all", "--dry-run"],
    "deploy.py --help": [sys.executable, DEPLOY, "--help"],
    'python -c "import modal"': [sys.executable, "-c", "import modal"],
}
MODAL = 'python -c "import modal"'
LIST = "deploy.py --list"
LIST_TARGET_SECONDS = 0.3
LIST_TARGET_RATIO = 1 / 3


def run_once(argv: list[str], *, write_bytecode: bool = False) -> float:
    env = {**os.environ, "COLUMNS": "100"}  # the same table layout on any terminal
    if write_bytecode:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    started = time.perf_counter()
    proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                          cwd=ROOT, check=False)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stderr.decode()}")
    return elapsed


def p90(values: list[float]) -> float:
    """Nearest-rank 90th percentile."""
    ordered = sorted(values)
    return ordered[math.ceil(0.9 * len(ordered)) - 1]


def measure(rounds: int) -> dict[str, list[float]]:
    for argv in COMMANDS.values():  # warm-up: matrix and bytecode caches filled
        run_once(argv, write_bytecode=True)
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(rounds):
        for name, argv in COMMANDS.items():
            times[name].append(run_once(argv))
    return times


def report(times: dict[str, list[float]], rounds: int) -> bool:
    modal = statistics.median(times[MODAL])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{rounds} interleaved rounds after a warm-up; Python {platform.python_version()} "
          f"on {platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {load:.2f}")
    print()
    print("| command | median (s) | p90 (s) | vs `import modal` |")
    print("|---|---:|---:|---:|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| `{name}` | {median:.3f} | {p90(values):.3f} | {median / modal:.2f}x |")
    listing = statistics.median(times[LIST])
    ok_time = listing < LIST_TARGET_SECONDS
    ok_ratio = listing <= modal * LIST_TARGET_RATIO
    print()
    print(f"target --list median < {LIST_TARGET_SECONDS} s: {listing:.3f} s "
          f"{'ok' if ok_time else 'MISSED'}")
    print(f"target --list <= 1/3 of import modal ({modal * LIST_TARGET_RATIO:.3f} s): "
          f"{listing / modal:.2f}x {'ok' if ok_ratio else 'MISSED'}")
    return ok_time and ok_ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="measured rounds (default 15)")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when a --list target is missed")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    met = report(measure(args.rounds), args.rounds)
    if args.check and not met:
        sys.exit(1)


if __name__ == "__main__":
    main()
