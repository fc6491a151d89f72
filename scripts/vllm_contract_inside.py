"""The half of the vLLM contract check that runs inside the throwaway vLLM environment.

`scripts/vllm_contract.py` runs this with that environment's Python:
    python vllm_contract_inside.py CASES.json RESULTS.json
It imports only vLLM (and what vLLM imports) and the standard library, reads the cases the
project generated, puts each through vLLM's own code, and writes what vLLM said. It
judges nothing: the driver compares. No GPU and no network are needed; what would need
them (the model's config.json from the Hub, a CUDA device) is not run and is said so.
"""

from __future__ import annotations

import json
import sys
import traceback


def one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0][:400] if text else type(exc).__name__


# ## `vllm serve` argv: vLLM's own parser and the start-up checks that need no model


def use_cpu_platform() -> None:
    """Without a GPU vLLM cannot infer a device and its parser will not build; like
    `vllm bench` (entrypoints/cli/main.py), fall back to vLLM's CPU platform. Only the
    defaults of a few device-dependent options change; every option this project passes
    is explicit, and those are what is compared."""
    from vllm import platforms

    if platforms.current_platform.is_unspecified():
        from vllm.platforms.cpu import CpuPlatform

        platforms.current_platform = CpuPlatform()


def serve_parser():
    """The parser `vllm` builds (entrypoints/cli/main.py main), with its `serve` command."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(description="vLLM CLI")
    subparsers = parser.add_subparsers(required=False, dest="subparser")
    command = ServeSubcommand()
    command.subparser_init(subparsers).set_defaults(dispatch_function=command.cmd)
    return parser, command


def check_argv(case: dict) -> dict:
    """Parse as `vllm serve` does, then run the checks it runs before loading the model."""
    import os

    from vllm.config.lora import LoRAConfig
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.common.cli_args import validate_api_server_args

    saved = dict(os.environ)
    os.environ.update(case.get("env", {}))
    try:
        parser, command = serve_parser()
        try:
            args = parser.parse_args(case["argv"][1:])  # without the leading "vllm"
        except SystemExit as exc:  # argparse's parser.error: what `vllm serve` exits with
            return {"ok": False, "stage": "parse", "error": f"argparse exit {exc.code}"}
        stage = "validate_parsed_serve_args"
        try:
            command.validate(args)  # entrypoints/common/cli_args.py validate_parsed_serve_args
            stage = "validate_api_server_args"
            validate_api_server_args(args)  # tool parser and reasoning parser registered
            stage = "AsyncEngineArgs.from_cli_args"
            engine = AsyncEngineArgs.from_cli_args(args)
            stage = "create_load_config"
            engine.create_load_config()
            stage = "create_structured_outputs_config"
            engine.create_structured_outputs_config()
            stage = "create_observability_config"
            engine.create_observability_config()
            if engine.enable_lora:
                stage = "LoRAConfig"  # as create_engine_config builds it
                LoRAConfig(max_lora_rank=engine.max_lora_rank, max_loras=engine.max_loras,
                           fully_sharded_loras=engine.fully_sharded_loras,
                           lora_dtype=engine.lora_dtype)
        except Exception as exc:  # noqa: BLE001 - report what vLLM raised, whatever it is
            return {"ok": False, "stage": stage, "error": one_line(exc)}
        lora = [{"name": m.name, "path": m.path} for m in (args.lora_modules or [])]
        return {
            "ok": True,
            "parsed": {
                "model": args.model_tag, "served_model_name": engine.served_model_name,
                "host": args.host, "port": args.port, "dtype": engine.dtype,
                "quantization": engine.quantization, "max_model_len": engine.max_model_len,
                "gpu_memory_utilization": engine.gpu_memory_utilization,
                "tensor_parallel_size": engine.tensor_parallel_size,
                "enforce_eager": engine.enforce_eager,
                "enable_sleep_mode": engine.enable_sleep_mode,
                "enable_auto_tool_choice": args.enable_auto_tool_choice,
                "tool_call_parser": args.tool_call_parser,
                "limit_mm_per_prompt": engine.limit_mm_per_prompt,
                "enable_lora": engine.enable_lora, "max_lora_rank": engine.max_lora_rank,
                "max_loras": engine.max_loras, "lora_modules": lora,
                "max_num_batched_tokens": engine.max_num_batched_tokens,
            },
        }
    finally:
        os.environ.clear()
        os.environ.update(saved)


# ## Request bodies: vLLM's own request models


def check_body(case: dict) -> dict:
    import warnings

    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    model = {"/v1/chat/completions": ChatCompletionRequest,
             "/v1/completions": CompletionRequest}[case["path"]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            request = model.model_validate(case["body"])
        except Exception as exc:  # noqa: BLE001
            return {"ok": False, "stage": model.__name__, "error": one_line(exc)}
        try:  # the engine-facing parameters, as the serving code derives them
            limit = getattr(request, "max_completion_tokens", None) or request.max_tokens
            params = request.to_sampling_params(max_tokens=limit or 16,
                                                default_sampling_params={})
        except Exception as exc:  # noqa: BLE001
            return {"ok": False, "stage": "to_sampling_params", "error": one_line(exc)}
    structured = getattr(params, "structured_outputs", None)
    return {"ok": True, "stream": bool(request.stream), "max_tokens": params.max_tokens,
            "structured_outputs": None if structured is None else
            sorted(k for k, v in vars(structured).items()
                   if v not in (None, False) and not k.startswith("_")),
            "warnings": sorted({str(w.message) for w in caught})}


# ## The facts the fit check and the refusals copy from vLLM's source


def facts(inputs: dict) -> dict:
    import typing

    import torch
    from vllm.config import lora as lora_config
    from vllm.config import model as model_config
    from vllm.lora.peft_helper import PEFTHelper

    out: dict = {}
    out["float16_refused_model_types"] = sorted(model_config._FLOAT16_NOT_SUPPORTED_MODELS)
    out["lora_ranks"] = list(typing.get_args(lora_config.MaxLoRARanks))
    from vllm import tool_parsers

    out["tool_parsers"] = sorted(tool_parsers._TOOL_PARSERS_TO_REGISTER)
    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16}
    out["dtype_checks"] = {}
    for key, (model_type, dtype) in inputs["model_dtypes"].items():
        try:
            model_config._check_valid_dtype(model_type, dtypes[dtype])
            out["dtype_checks"][key] = "ok"
        except ValueError as exc:
            out["dtype_checks"][key] = one_line(exc)
    out["fused_3d_moe"] = fused_3d_moe_architectures()
    out["batch_defaults"] = batch_defaults(inputs["gpus"])
    out["kv"] = kv_facts(inputs["kv"])
    out["peft"] = {}
    rank_config = lora_config.LoRAConfig(max_lora_rank=inputs["peft_max_lora_rank"])
    for name, adapter_config in inputs["peft"].items():
        try:
            PEFTHelper.from_dict(adapter_config).validate_legal(rank_config)
            out["peft"][name] = "accepted"
        except Exception as exc:  # noqa: BLE001
            out["peft"][name] = one_line(exc)
    return out


def fused_3d_moe_architectures() -> list[str]:
    """Every registered architecture whose class sets is_3d_moe_weight (modules that
    mention it are imported; the others cannot set it)."""
    import importlib
    import importlib.util
    from pathlib import Path

    from vllm.model_executor.models.registry import _VLLM_MODELS

    found = []
    for arch, (module_name, class_name) in sorted(_VLLM_MODELS.items()):
        module = (module_name if module_name.startswith("vllm.")
                  else f"vllm.model_executor.models.{module_name}")
        try:
            spec = importlib.util.find_spec(module)
        except ImportError:
            spec = None
        if spec is None or not spec.origin or \
                "is_3d_moe_weight" not in Path(spec.origin).read_text():
            continue
        try:
            cls = getattr(importlib.import_module(module), class_name)
        except Exception as exc:  # noqa: BLE001
            found.append(f"{arch}: import failed ({one_line(exc)})")
            continue
        if getattr(cls, "is_3d_moe_weight", False):
            found.append(arch)
    return found


def batch_defaults(gpus: dict) -> dict:
    """EngineArgs.get_batch_defaults as each GPU would answer it: the platform's device
    memory and name patched in (there is no GPU here)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform
    from vllm.usage.usage_lib import UsageContext

    out = {}
    for key, gpu in gpus.items():
        patches = {"get_device_total_memory": lambda *a, _m=gpu["memory"], **k: _m,
                   "get_device_name": lambda *a, _n=gpu["name"], **k: _n,
                   "is_device_capability": lambda *a, **k: False}
        cls = type(current_platform)
        saved = {name: cls.__dict__.get(name) for name in patches}
        try:
            for name, fn in patches.items():
                setattr(cls, name, classmethod(fn))
            tokens, _ = EngineArgs.get_batch_defaults(world_size=1)
            out[key] = tokens[UsageContext.OPENAI_API_SERVER]
        finally:
            for name, original in saved.items():
                if original is None:
                    delattr(cls, name)
                else:
                    setattr(cls, name, original)
    return out


def kv_facts(models: dict) -> dict:
    """Pages, sliding-window blocks and layer groups from vLLM's KV cache specs and planner."""
    import torch
    from vllm.v1.core.kv_cache_planning import _get_kv_cache_groups_uniform_page_size
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    out = {}
    for key, m in models.items():
        full = FullAttentionSpec(block_size=16, num_kv_heads=m["kv_heads"],
                                 head_size=m["head_dim"], dtype=torch.bfloat16)
        entry = {"page_bytes": full.page_size_bytes,
                 "full_blocks": -(-m["max_model_len"] // 16)}
        if m["sliding_layers"]:
            sliding = SlidingWindowSpec(block_size=16, num_kv_heads=m["kv_heads"],
                                        head_size=m["head_dim"], dtype=torch.bfloat16,
                                        sliding_window=m["window"])
            entry["sliding_blocks"] = {
                gpu: sliding.max_admission_blocks_per_request(in_flight, m["max_model_len"])
                for gpu, in_flight in m["in_flight"].items()}
            specs = {f"layers.{i}": (sliding if i < m["sliding_layers"] else full)
                     for i in range(m["layers"])}
            groups = _get_kv_cache_groups_uniform_page_size(specs)
            entry["groups"] = [[type(g.kv_cache_spec).__name__, len(g.layer_names)]
                               for g in groups]
        out[key] = entry
    return out


def main() -> None:
    with open(sys.argv[1]) as f:
        cases = json.load(f)
    import vllm

    results = {"vllm_version": vllm.__version__, "argv": {}, "bodies": [], "facts": {}}
    results["facts"] = facts(cases["facts"])  # before the CPU platform: batch defaults are
    use_cpu_platform()  # a GPU's (EngineArgs.get_batch_defaults returns CPU ones on CPU)
    for label, case in cases["argv"].items():
        try:
            results["argv"][label] = check_argv(case)
        except Exception:  # noqa: BLE001 - a crash of the check itself, reported as such
            results["argv"][label] = {"ok": False, "stage": "crash",
                                      "error": traceback.format_exc(limit=3)}
    for case in cases["bodies"]:
        results["bodies"].append(check_body(case))
    with open(sys.argv[2], "w") as f:
        json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
