"""The vLLM engine: its `vllm serve` command line, and its process life cycle.

`engine_argv` is pure (the dry run prints it; tests compare it). `Engine`
starts that argv without a shell, waits for `/health` under a deadline, fails
at once if the process dies, and keeps the tail of vLLM's log for the error.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import config

HOST = "127.0.0.1"  # vLLM is never reachable from outside its container: the gateway is
PORT = 8000
ADAPTERS_MOUNT = "/adapters"  # where the LoRA adapters Volume is mounted in a GPU pool
LOG_TAIL_LINES = 40


def engine_argv(fit: config.Fit, defaults: config.Defaults, *, port: int = PORT,
                sleep_mode: bool = False) -> list[str]:
    """The `vllm serve` argv for one model on one GPU type (the fit decides the GPU count)."""
    model = fit.model
    argv = ["vllm", "serve", model.huggingface_id]
    if model.revision:
        argv += ["--revision", model.revision]
    # The canonical name is echoed in responses; the short key is accepted as well.
    argv += ["--served-model-name", *dict.fromkeys([model.name, model.key])]
    argv += ["--host", HOST, "--port", str(port)]
    argv += ["--dtype", model.dtype]
    if model.quantization:
        argv += ["--quantization", model.quantization]
    argv += ["--max-model-len", str(model.max_model_len)]
    argv += ["--gpu-memory-utilization", str(defaults.gpu_memory_utilization)]
    argv += ["--tensor-parallel-size", str(fit.count)]
    if model.tool_parser:
        argv += ["--enable-auto-tool-choice", "--tool-call-parser", model.tool_parser]
    if model.chat_template:
        argv += ["--chat-template", model.chat_template]
    if model.vision:
        limits = {"image": model.vision.images, "video": model.vision.videos}
        argv += ["--limit-mm-per-prompt", json.dumps(limits, separators=(",", ":"))]
    if model.adapters:  # served under their own names; the base model stays servable too
        argv += ["--enable-lora", "--max-lora-rank", str(model.lora_rank),
                 "--max-loras", str(model.loras_on_gpu), "--lora-modules",
                 *(f"{a.name}={ADAPTERS_MOUNT}/{a.path}" for a in model.adapters)]
    if defaults.fast_boot:
        argv += ["--enforce-eager"]  # no torch.compile, no CUDA graphs: a faster cold start
    if sleep_mode:
        argv += ["--enable-sleep-mode"]  # lets a GPU snapshot hold weights, not a busy engine
    argv += list(model.extra_args)
    return argv


def engine_env(sleep_mode: bool = False) -> dict[str, str]:
    """Environment the engine needs beyond the container's own."""
    env = {"HF_XET_HIGH_PERFORMANCE": "1"}
    if sleep_mode:
        env["VLLM_SERVER_DEV_MODE"] = "1"  # exposes /sleep and /wake_up on localhost only
    return env


class EngineError(config.UserError):
    """The engine did not become ready; the message carries the tail of its log."""


class Engine:
    """One `vllm serve` child process, with its log relayed and its tail kept."""

    def __init__(self, argv: list[str], *, env: dict[str, str] | None = None,
                 health_url: str = f"http://{HOST}:{PORT}/health"):
        self.argv = argv
        self.env = {**os.environ, **(env or {})}
        self.health_url = health_url
        self.tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        self.process: subprocess.Popen | None = None
        self._relay: threading.Thread | None = None

    def start(self) -> None:
        # An argument list, no shell: nothing in the config can become a shell command.
        self.process = subprocess.Popen(
            self.argv, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, errors="replace", start_new_session=True,
        )
        self._relay = threading.Thread(target=self._relay_log, daemon=True)
        self._relay.start()

    def _relay_log(self) -> None:
        assert self.process and self.process.stdout
        for line in self.process.stdout:
            self.tail.append(line.rstrip("\n"))
            sys.stdout.write(line)  # Modal shows the container's stdout as the app's logs

    def log_tail(self) -> str:
        if self._relay:
            self._relay.join(timeout=1)  # let a dead process's last lines arrive
        return "\n".join(self.tail)

    def wait_ready(self, timeout: float, poll_interval: float = 0.5) -> float:
        """Block until /health answers 200; return seconds waited. Raises EngineError."""
        import httpx

        assert self.process, "start() first"
        started = time.monotonic()
        deadline = started + timeout
        with httpx.Client(timeout=2.0) as client:
            while True:
                code = self.process.poll()
                if code is not None:
                    raise EngineError(
                        f"vLLM exited with code {code} before it was ready; last log lines:\n"
                        f"{self.log_tail()}"
                    )
                try:
                    if client.get(self.health_url).status_code == 200:
                        return time.monotonic() - started
                except httpx.HTTPError:
                    pass  # not listening yet
                if time.monotonic() >= deadline:
                    self.stop()
                    raise EngineError(
                        f"vLLM was not ready after {timeout:g} s; last log lines:\n"
                        f"{self.log_tail()}"
                    )
                time.sleep(poll_interval)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group (vLLM's workers too), then SIGKILL what is left of it.

        Also after vLLM itself has exited: its workers may outlive it, holding the GPU.
        """
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return  # no process of the group is left
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=5.0)
