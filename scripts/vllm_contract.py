"""Contract check for a vLLM upgrade: what this project sends vLLM, put through vLLM itself.

Run it before changing `defaults.vllm_version` in models.yaml (and after: with the new
version, on a branch), not in CI (it installs vLLM, ~10 GB):

    uv run python scripts/vllm_contract.py                # the pinned version
    uv run python scripts/vllm_contract.py --version 0.34.0 --fresh

It installs `vllm==<version>` with pip into a throwaway virtual environment
(results/vllm-contract-venv by default, gitignored; never the project's .venv), then:

1. every `vllm serve` command line the matrix generates (every cell), and the variants a
   user can switch on (GPU snapshots with sleep mode, LoRA adapters, tool parsers, fp8,
   fast_boot off), goes through vLLM's own argument parser (the `vllm serve` parser of
   entrypoints/cli/main.py) and the start-up checks that need neither a GPU nor the model
   (validate_parsed_serve_args, validate_api_server_args, AsyncEngineArgs.from_cli_args,
   the load, structured-output, observability and LoRA configs); the parsed values are
   compared with what we meant. Not run: ModelConfig and everything after it, which
   fetch the model's config.json from the Hub (gated for Gemma) and need a GPU;
2. every request body the conformance suite (`--test-gpu`), the warm-up (`--warm`) and
   the benchmark (`--bench`) send, as vLLM receives them (recorded behind the real
   gateway, `deploy.py --serve-local`), goes through vLLM's own request models
   (ChatCompletionRequest / CompletionRequest) and `to_sampling_params`;
3. the facts config.py and adapters.py copy from vLLM's source are read back from it:
   the float16 refusals, the LoRA ranks, the fused 3-D MoE architectures, the default
   batch budget per GPU, KV pages, sliding-window blocks and layer groups, and the PEFT
   checks an adapter must pass.

Exit 0 when vLLM agrees with the project on all of it, 1 otherwise (each disagreement is
a line), 2 when vLLM could not be installed (pip's output is in the log it names).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import adapters
import config
import engine

DEFAULT_VENV = ROOT / "results" / "vllm-contract-venv"
INSIDE = Path(__file__).with_name("vllm_contract_inside.py")
KEY = "sk-contract-check-0123456789"
TOOL_PARSERS = ("hermes", "pythonic", "llama3_json", "mistral")  # ours, and common choices


# ## 1. The throwaway vLLM environment


def installed_version(venv: Path) -> str | None:
    python = venv / "bin" / "python"
    if not python.exists():
        return None
    code = "import importlib.metadata as m; print(m.version('vllm'))"
    done = subprocess.run([str(python), "-c", code], check=False, capture_output=True,
                          text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def ensure_vllm(venv: Path, version: str, *, python: str, fresh: bool,
                find_links: list[str]) -> float:
    """vllm==version in `venv` (created with `python -m venv`); seconds spent installing."""
    if fresh and venv.exists():
        shutil.rmtree(venv)
    if installed_version(venv) == version:
        print(f"vllm {version} already in {venv}")
        return 0.0
    if venv.resolve() == (ROOT / ".venv").resolve():
        sys.exit("refusing to install vLLM into the project's own .venv; choose --venv")
    started = time.monotonic()
    log = venv.with_name(venv.name + "-install.log")
    venv.parent.mkdir(parents=True, exist_ok=True)
    steps = [[python, "-m", "venv", "--clear", str(venv)],
             [str(venv / "bin" / "pip"), "install", f"vllm=={version}",
              *(arg for d in find_links for arg in ("--find-links", d))]]
    with log.open("w") as out:
        for step in steps:
            print("$", " ".join(step), flush=True)
            out.write("$ " + " ".join(step) + "\n")
            out.flush()
            if subprocess.run(step, check=False, stdout=out, stderr=subprocess.STDOUT).returncode:
                tail = log.read_text().splitlines()[-15:]
                print("\n".join(tail))
                print(f"Error: installing vllm=={version} failed; pip's output is in {log}")
                sys.exit(2)
    took = time.monotonic() - started
    print(f"installed vllm {installed_version(venv)} in {took:.0f} s (log: {log})")
    return took


# ## 2. Every command line the matrix generates, and the variants


def expected(fit: config.Fit, defaults: config.Defaults, *, sleep_mode: bool = False) -> dict:
    """What vLLM must parse out of our argv for this cell."""
    model = fit.model
    return {
        "model": model.huggingface_id,
        "served_model_name": list(dict.fromkeys([model.name, model.key])),
        "host": engine.HOST, "port": engine.PORT, "dtype": model.dtype,
        "quantization": model.quantization, "max_model_len": model.max_model_len,
        "gpu_memory_utilization": defaults.gpu_memory_utilization,
        "tensor_parallel_size": fit.count, "enforce_eager": defaults.fast_boot,
        "enable_sleep_mode": sleep_mode,
        "tool_call_parser": model.tool_parser,
        "limit_mm_per_prompt": ({"image": model.vision.images, "video": model.vision.videos}
                                if model.vision else {}),
        "lora_modules": [{"name": a.name, "path": f"{engine.ADAPTERS_MOUNT}/{a.path}"}
                         for a in model.adapters],
        **({"enable_lora": True, "max_lora_rank": model.lora_rank,
            "max_loras": model.loras_on_gpu} if model.adapters else {}),
    }


def argv_cases(matrix: config.Matrix) -> dict[str, dict]:
    cases: dict[str, dict] = {}
    defaults = matrix.defaults

    def add(label, fit, *, sleep_mode=False, defaults=defaults, fails=False, argv=None):
        cases[label] = {
            "argv": argv or engine.engine_argv(fit, defaults, sleep_mode=sleep_mode),
            "env": engine.engine_env(sleep_mode),
            "expect": {"fails": True} if fails else expected(fit, defaults,
                                                             sleep_mode=sleep_mode)}

    for fit in matrix.legacy_cells():  # every cell that fits: its pool's command line
        add(f"{fit.model.key} on {fit.gpu.key}", fit)
    def fit_of(variant: config.Model, gpu: config.GPU) -> config.Fit:
        return config.fit_on_gpu(variant, gpu, defaults, matrix.billing)

    for model in matrix.models.values():
        # the smallest GPU that holds the model alone (variants may need more of it)
        gpu = next(f.gpu for f in matrix.legacy_cells() if f.model is model and f.count == 1)
        base = fit_of(model, gpu)
        add(f"{model.key}: GPU snapshot (sleep mode)", base, sleep_mode=True)
        add(f"{model.key}: fast_boot off", base,
            defaults=dataclasses.replace(defaults, fast_boot=False))
        add(f"{model.key}: fp8", fit_of(dataclasses.replace(model, quantization="fp8"), gpu))
        for parser in TOOL_PARSERS:
            add(f"{model.key}: tool parser {parser}",
                fit_of(dataclasses.replace(model, tool_parser=parser), gpu))
        with_adapters = dataclasses.replace(model, max_loras=2, adapters=(
            config.Adapter(name="contract-a", rank=16, path=f"{model.key}/a"),
            config.Adapter(name="contract-b", rank=64, path=f"{model.key}/b")))
        add(f"{model.key}: two LoRA adapters", fit_of(with_adapters, gpu))
        # What config.py refuses, shown to be refused by vLLM itself: a comma makes
        # LoRAParserAction read `name=path` as JSON and exit.
        comma = dataclasses.replace(with_adapters, adapters=(
            config.Adapter(name="contract-a", rank=16, path=f"{model.key}/a,b"),))
        add(f"{model.key}: refused: an adapter path with a comma", fit_of(comma, gpu),
            fails=True)
    return cases


# ## 3. Every request body the suite, the warm-up and the benchmark send


class Recorder(BaseHTTPRequestHandler):
    """A stand-in for `vllm serve` that answers in OpenAI's shapes and records every body.

    The answers only keep the clients going (the suite's checks fail on them, which is
    not what is being checked); the recorded bodies are what vLLM would have received."""

    bodies: ClassVar[list[dict]] = []
    source = ""
    models: ClassVar[list[str]] = []
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def _json(self, status: int, data) -> None:
        raw = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self):
        if self.path == "/health":
            return self._json(200, {})
        if self.path == "/v1/models":
            return self._json(200, {"object": "list", "data": [
                {"id": m, "object": "model", "owned_by": "vllm"} for m in self.models]})
        return self._json(404, {"error": {"message": "not found", "type": "NotFoundError",
                                          "param": None, "code": 404}})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        Recorder.bodies.append({"source": Recorder.source, "path": self.path, "body": body})
        chat = self.path.endswith("/chat/completions")
        base = {"id": "contract-1", "created": int(time.time()), "model": body.get("model")}
        if not body.get("stream"):
            choice = ({"index": 0, "message": {"role": "assistant", "content": "hello"},
                       "finish_reason": "stop"} if chat else
                      {"index": 0, "text": " hello", "finish_reason": "stop"})
            return self._json(200, {**base, "object": "chat.completion" if chat else
                                    "text_completion", "choices": [choice],
                                    "usage": {"prompt_tokens": 4, "completion_tokens": 1,
                                              "total_tokens": 5}})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        tokens = max(1, min(int(body.get("max_tokens") or 4), 4))
        kind = "chat.completion.chunk" if chat else "text_completion"
        for i in range(tokens):
            choice = ({"index": 0, "delta": {"content": "x"}, "finish_reason": None} if chat
                      else {"index": 0, "text": "x", "finish_reason": None})
            if i == tokens - 1:
                choice["finish_reason"] = "length"
            self.wfile.write(b"data: " + json.dumps({**base, "object": kind,
                                                      "choices": [choice]}).encode() + b"\n\n")
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": 4, "completion_tokens": tokens, "total_tokens": 4 + tokens}
            self.wfile.write(b"data: " + json.dumps({**base, "object": kind, "choices": [],
                                                      "usage": usage}).encode() + b"\n\n")
        self.wfile.write(b"data: [DONE]\n\n")
        self.close_connection = True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, deadline_s: float = 90) -> None:
    import httpx

    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the gateway exited with {process.returncode}: "
                             f"{process.stdout.read() if process.stdout else ''}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the gateway did not answer {url} within {deadline_s:g} s")


def matrix_with_adapters(folder: Path) -> Path:
    """The shipped matrix plus two adapters on the first model: the suite then sends its
    per-adapter completion too."""
    text = config.DEFAULT_PATH.read_text()
    matrix = config.load()
    first = next(iter(matrix.models))
    anchor = f"  {first}:\n"
    block = (f"  {first}:\n    adapters:\n      - {{name: contract-a, rank: 16, path: {first}/a}}\n"
             f"      - {{name: contract-b, rank: 16, path: {first}/b}}\n")
    path = folder / "models.yaml"
    path.write_text(text.replace(anchor, block, 1))
    config.load(path)  # still a valid matrix
    return path


def recorded_bodies(workdir: Path) -> list[dict]:
    """Run the suite, the warm-up and the benchmark through the real gateway."""
    matrix_path = matrix_with_adapters(workdir)
    matrix = config.load(matrix_path)
    gpu = next(iter(matrix.gpus))
    Recorder.models = [alias for m in matrix.models.values() for alias in (m.name, m.key)]
    Recorder.models += [a.name for m in matrix.models.values() for a in m.adapters]
    Recorder.bodies = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = free_port()
    env = {**os.environ, "VLLM_API_KEY": KEY, "MODAL_VLLM_CACHE_DIR": str(workdir / "cache")}
    gateway = subprocess.Popen(
        [sys.executable, str(ROOT / "deploy.py"), "--serve-local", "--port", str(port),
         "--upstream", f"http://127.0.0.1:{server.server_port}", "--config", str(matrix_path)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{base}/health", gateway)
        common = ["--base-url", base, "--api-key", KEY, "--config", str(matrix_path),
                  "--deadline", "60s", "--json"]
        runs = {"--test-gpu": ["--test-gpu", gpu], "--warm": ["--warm", gpu]}
        for model in matrix.models:
            runs[f"--bench {model}"] = [
                "--bench", gpu, "--test-model", model, "--requests", "2", "--concurrency", "2",
                "--input-len", "16", "--output-len", "4", "--results-dir", str(workdir)]
        for source, args in runs.items():
            Recorder.source = source
            subprocess.run([sys.executable, str(ROOT / "deploy.py"), *args, *common], env=env,
                           check=False, capture_output=True, text=True, timeout=600)
    finally:
        gateway.terminate()
        gateway.wait(timeout=30)
        server.shutdown()
    unique, seen = [], set()
    for item in Recorder.bodies:
        key = json.dumps([item["path"], item["body"]], sort_keys=True)
        if key not in seen:
            seen.add(key)
            unique.append(item)
    return unique


# ## 4. The facts copied from vLLM's source


def peft_cases() -> dict[str, dict]:
    plain = {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"], "bias": "none"}
    return {
        "plain LoRA": plain,
        "rank_pattern within max rank": {**plain, "rank_pattern": {"down_proj": 32}},
        "rank_pattern above max rank": {**plain, "rank_pattern": {"down_proj": 64}},
        "use_dora": {**plain, "use_dora": True},
        "lora_bias": {**plain, "lora_bias": True},
        "bias all": {**plain, "bias": "all"},
        "bias lora_only": {**plain, "bias": "lora_only"},
        "modules_to_save lm_head": {**plain, "modules_to_save": ["lm_head"]},
        "modules_to_save score": {**plain, "modules_to_save": ["score"]},
        "init pissa": {**plain, "init_lora_weights": "pissa"},
        "init olora": {**plain, "init_lora_weights": "olora"},
        "init loftq": {**plain, "init_lora_weights": "loftq"},
        "init gaussian": {**plain, "init_lora_weights": "gaussian"},
        "init eva": {**plain, "init_lora_weights": "eva"},
        "alora": {**plain, "alora_invocation_tokens": [1, 2]},
        "layer_replication": {**plain, "layer_replication": [[0, 2]]},
        "use_qalora": {**plain, "use_qalora": True},
        "no lora_alpha": {k: v for k, v in plain.items() if k != "lora_alpha"},
    }


PEFT_MAX_RANK = 32  # the --max-lora-rank the PEFT cases are checked against
# Where this project refuses what vLLM's PEFTHelper itself accepts, and why.
STRICTER = {"modules_to_save score": "lora/model_manager.py loads `score` only into a "
                                     "classification model's head; ours generate"}


def our_peft_verdict(adapter_config: dict) -> bool:
    """True when adapters.py refuses it (PEFT problems, or a rank above the max)."""
    if adapters.peft_problems(adapter_config):
        return True
    return adapters.effective_rank(adapter_config)[0] > PEFT_MAX_RANK


def facts_input(matrix: config.Matrix) -> dict:
    dtypes = {f"{m.key} ({m.model_type}, {m.dtype})": [m.model_type, m.dtype]
              for m in matrix.models.values() if m.model_type}
    for model_type in ("gemma2", "gemma3", "gemma3_text", "glm4", "llama", "qwen3"):
        for dtype in ("float16", "bfloat16"):
            dtypes[f"{model_type} {dtype}"] = [model_type, dtype]
    kv = {}
    for m in matrix.models.values():
        if m.sliding_window:
            kv[m.key] = {"kv_heads": m.kv_heads, "head_dim": m.head_dim, "layers": m.layers,
                         "max_model_len": m.max_model_len, "window": m.sliding_window.window,
                         "sliding_layers": m.sliding_window.layers,
                         "in_flight": {g.key: config.BATCHES_IN_FLIGHT *
                                       g.default_max_num_batched_tokens
                                       for g in matrix.gpus.values()}}
    return {"model_dtypes": dtypes, "kv": kv, "peft": peft_cases(),
            "peft_max_lora_rank": PEFT_MAX_RANK,
            "gpus": {g.key: {"memory": int(g.vram_gb * 1e9), "name": g.modal_gpu}
                     for g in matrix.gpus.values()}}


# ## 5. Compare


def compare(matrix: config.Matrix, cases: dict, results: dict) -> tuple[list[str], list[str]]:
    """(agreements, disagreements), one line each."""
    good, bad = [], []

    def judge(ok: bool, line: str) -> None:
        (good if ok else bad).append(line)

    for label, case in cases["argv"].items():
        got, want = results["argv"][label], case["expect"]
        if want.get("fails"):
            judge(not got["ok"], f"argv {label}: vLLM refuses it "
                  f"({got.get('stage')}: {got.get('error')})" if not got["ok"]
                  else f"argv {label}: vLLM accepted what config.py refuses")
            continue
        if not got["ok"]:
            judge(False, f"argv {label}: {got['stage']}: {got['error']}")
            continue
        diffs = [f"{k} {got['parsed'].get(k)!r} != {v!r}" for k, v in want.items()
                 if got["parsed"].get(k) != v]
        judge(not diffs, f"argv {label}: " + ("; ".join(diffs) or "parsed as meant"))
    for case, got in zip(cases["bodies"], results["bodies"], strict=True):
        what = f"body {case['source']} {case['path']} {json.dumps(case['body'])[:90]}"
        judge(got["ok"], f"{what}: " + ("valid" if got["ok"] else
                                        f"{got['stage']}: {got['error']}"))
    facts = results["facts"]
    judge(facts["float16_refused_model_types"] == sorted(config.FLOAT16_REFUSED_MODEL_TYPES),
          f"float16 refusals: vLLM {facts['float16_refused_model_types']}, config.py "
          f"{sorted(config.FLOAT16_REFUSED_MODEL_TYPES)}")
    judge(facts["tool_parsers"] == sorted(config.TOOL_PARSERS),
          f"tool parsers: vLLM {facts['tool_parsers']}, config.py {sorted(config.TOOL_PARSERS)}")
    judge(facts["lora_ranks"] == list(config.LORA_RANKS),
          f"LoRA ranks: vLLM {facts['lora_ranks']}, config.py {list(config.LORA_RANKS)}")
    for key, verdict in facts["dtype_checks"].items():
        model_type, dtype = cases["facts"]["model_dtypes"][key]
        ours = dtype == "float16" and model_type in config.FLOAT16_REFUSED_MODEL_TYPES
        judge(ours == (verdict != "ok"), f"dtype {key}: vLLM {verdict}; config.py "
              f"{'refuses' if ours else 'takes'} it")
    judge(facts["fused_3d_moe"] == sorted(config.FUSED_3D_MOE_ARCHITECTURES),
          f"fused 3-D MoE architectures: vLLM {facts['fused_3d_moe']}, config.py "
          f"{sorted(config.FUSED_3D_MOE_ARCHITECTURES)}")
    for key, tokens in facts["batch_defaults"].items():
        ours = matrix.gpus[key].default_max_num_batched_tokens
        judge(tokens == ours, f"default max_num_batched_tokens on {key}: vLLM {tokens}, "
              f"config.py {ours}")
    for key, got in facts["kv"].items():
        model = matrix.models[key]
        gpus = list(matrix.gpus.values())
        layout = config.kv_layout(model, gpus[0], 1)
        judge(got["page_bytes"] == layout.page_bytes and got["full_blocks"] == layout.full_blocks,
              f"KV page and full-attention blocks of {key}: vLLM {got['page_bytes']} bytes, "
              f"{got['full_blocks']} blocks; config.py {layout.page_bytes}, "
              f"{layout.full_blocks}")
        for gpu in gpus:
            ours = config.kv_layout(model, gpu, 1).sliding_blocks
            theirs = got["sliding_blocks"][gpu.key]
            judge(theirs == ours, f"sliding-window blocks per request of {key} on {gpu.key}: "
                  f"vLLM {theirs}, config.py {ours}")
        kinds = [kind for kind, _ in got["groups"]]
        theirs = (max(size for _, size in got["groups"]), kinds.count("FullAttentionSpec"),
                  kinds.count("SlidingWindowSpec"))
        ours = (layout.group_size, layout.full_groups, layout.sliding_groups)
        judge(theirs == ours, f"KV cache groups of {key} (size, full, sliding): vLLM {theirs}, "
              f"config.py {ours}")
    for name, verdict in facts["peft"].items():
        ours = our_peft_verdict(cases["facts"]["peft"][name])
        theirs = verdict != "accepted"
        if ours and not theirs and name in STRICTER:
            judge(True, f"PEFT {name}: vLLM's PEFTHelper accepts it, adapters.py refuses it: "
                  f"{STRICTER[name]}")
            continue
        judge(ours == theirs, f"PEFT {name}: vLLM {verdict}; adapters.py "
              f"{'refuses' if ours else 'accepts'} it")
    return good, bad


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", help="vLLM version (default: models.yaml's vllm_version)")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV,
                        help=f"throwaway environment (default: {DEFAULT_VENV.relative_to(ROOT)})")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter to create it with (vLLM 0.33: Python 3.11 to 3.14)")
    parser.add_argument("--fresh", action="store_true", help="recreate the environment")
    parser.add_argument("--find-links", action="append", default=[], metavar="DIR",
                        help="extra wheels for pip (e.g. a downloaded vLLM wheel)")
    parser.add_argument("--verbose", action="store_true", help="print agreements too")
    options = parser.parse_args()
    matrix = config.load()
    version = options.version or matrix.defaults.vllm_version
    started = time.monotonic()
    install_s = ensure_vllm(options.venv, version, python=options.python,
                            fresh=options.fresh, find_links=options.find_links)
    collect_started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vllm-contract-") as tmp:
        cases = {"argv": argv_cases(matrix), "bodies": recorded_bodies(Path(tmp)),
                 "facts": facts_input(matrix)}
        collect_s = time.monotonic() - collect_started
        cases_file, results_file = Path(tmp) / "cases.json", Path(tmp) / "results.json"
        cases_file.write_text(json.dumps(cases))
        check_started = time.monotonic()
        done = subprocess.run([str(options.venv / "bin" / "python"), str(INSIDE),
                               str(cases_file), str(results_file)],
                              check=False, capture_output=True, text=True)
        check_s = time.monotonic() - check_started
        if done.returncode:
            print(done.stderr[-3000:])
            print("Error: the check inside the vLLM environment crashed (above)")
            return 1
        results = json.loads(results_file.read_text())
    good, bad = compare(matrix, cases, results)
    report = options.venv.with_name("vllm-contract-report.json")
    report.write_text(json.dumps({"vllm_version": results["vllm_version"], "agree": good,
                                  "disagree": bad, "cases": cases, "results": results},
                                 indent=1, default=str))
    for line in good if options.verbose else []:
        print(f"ok    {line}")
    for line in bad:
        print(f"FAIL  {line}")
    warned = sorted({w for r in results["bodies"] for w in r.get("warnings", [])})
    for warning in warned:
        print(f"note  vLLM warns on some request bodies: {warning}")
    total = time.monotonic() - started
    print(f"vLLM {results['vllm_version']}: {len(good)} agree, {len(bad)} disagree "
          f"({len(cases['argv'])} command lines, {len(cases['bodies'])} request bodies, "
          f"{len(good) + len(bad) - len(cases['argv']) - len(cases['bodies'])} facts); "
          f"install {install_s:.0f} s, recording {collect_s:.0f} s, vLLM checks "
          f"{check_s:.0f} s, total {total:.0f} s. Report: {report}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
