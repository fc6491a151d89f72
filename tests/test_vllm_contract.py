"""scripts/vllm_contract.py without vLLM: the cases it builds and how it judges vLLM's answers.

The check itself (vLLM installed in a throwaway environment) is not part of the suite: it
is run by hand before a vLLM upgrade (README, "Before changing vllm_version"). These tests
keep the driver honest: every cell and variant is sent, and a disagreement is a failure.
"""

import copy
import importlib.util
import json
import sys

import pytest

import config
import engine

ROOT = config.DEFAULT_PATH.parent


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


contract = load_script("vllm_contract")


def test_every_cell_and_every_variant_is_a_case(matrix):
    cases = contract.argv_cases(matrix)
    cells = [f"{f.model.key} on {f.gpu.key}" for f in matrix.legacy_cells()]
    assert [label for label in cases if " on " in label] == cells  # all 15
    for model in matrix.models:
        for variant in ("GPU snapshot (sleep mode)", "fast_boot off", "fp8",
                        "two LoRA adapters", "refused: an adapter path with a comma",
                        *(f"tool parser {p}" for p in contract.TOOL_PARSERS)):
            assert f"{model}: {variant}" in cases
    snapshot = cases["gemma-3-12b: GPU snapshot (sleep mode)"]
    assert snapshot["argv"][-1] == "--enable-sleep-mode"
    assert snapshot["env"]["VLLM_SERVER_DEV_MODE"] == "1"
    lora = cases["qwen3-vl-30b: two LoRA adapters"]["expect"]
    assert (lora["max_lora_rank"], lora["max_loras"]) == (64, 2)
    assert lora["lora_modules"][1] == {"name": "contract-b",
                                       "path": f"{engine.ADAPTERS_MOUNT}/qwen3-vl-30b/b"}
    assert cases["gemma-3-27b: refused: an adapter path with a comma"]["expect"] == {
        "fails": True}


def agreeing_results(matrix, cases) -> dict:
    """What vLLM 0.33 answered in the run recorded in the README, in the same shape."""
    argv = {label: ({"ok": False, "stage": "parse", "error": "argparse exit 2"}
                    if case["expect"].get("fails") else
                    {"ok": True, "parsed": dict(case["expect"])})
            for label, case in cases["argv"].items()}
    facts = cases["facts"]
    kv = {}
    for key in facts["kv"]:
        layout = config.kv_layout(matrix.models[key], next(iter(matrix.gpus.values())), 1)
        groups = [["FullAttentionSpec", layout.group_size]] * layout.full_groups + \
                 [["SlidingWindowSpec", layout.group_size]] * layout.sliding_groups
        kv[key] = {"page_bytes": layout.page_bytes, "full_blocks": layout.full_blocks,
                   "groups": groups,
                   "sliding_blocks": {g.key: config.kv_layout(matrix.models[key], g, 1)
                                      .sliding_blocks for g in matrix.gpus.values()}}
    return {
        "vllm_version": "0.33.0", "argv": argv, "bodies": [{"ok": True}] * len(cases["bodies"]),
        "facts": {
            "float16_refused_model_types": ["gemma2", "gemma3", "gemma3_text", "glm4"],
            "lora_ranks": [1, 8, 16, 32, 64, 128, 256, 320, 512],
            "tool_parsers": sorted(config.TOOL_PARSERS),
            "dtype_checks": {k: ("ValueError: no float16" if d == "float16" and t in
                                 config.FLOAT16_REFUSED_MODEL_TYPES else "ok")
                             for k, (t, d) in facts["model_dtypes"].items()},
            "fused_3d_moe": sorted(config.FUSED_3D_MOE_ARCHITECTURES),
            "batch_defaults": {"l40s": 2048, "a100": 2048, "h100": 8192, "h200": 8192,
                               "b200": 16384},
            "kv": kv,
            "peft": {name: ("accepted" if not contract.our_peft_verdict(c)
                            or name in contract.STRICTER else "ValueError: refused")
                     for name, c in facts["peft"].items()},
        },
    }


@pytest.fixture(scope="module")
def cases(matrix):
    return {"argv": contract.argv_cases(matrix),
            "bodies": [{"source": "--warm", "path": "/v1/completions",
                        "body": {"model": "m", "prompt": "Hi", "max_tokens": 1}}],
            "facts": contract.facts_input(matrix)}


def test_agreement_is_reported_as_such(matrix, cases):
    good, bad = contract.compare(matrix, cases, agreeing_results(matrix, cases))
    assert bad == []
    assert len(good) == len(cases["argv"]) + 1 + 3 + len(cases["facts"]["model_dtypes"]) + 1 \
        + 5 + 2 * (1 + 5 + 1) + len(cases["facts"]["peft"])


@pytest.mark.parametrize(("edit", "line"), [
    (lambda r: r["argv"]["gemma-3-12b on h100"]["parsed"].update(tensor_parallel_size=2),
     "argv gemma-3-12b on h100: tensor_parallel_size 2 != 1"),
    (lambda r: r["argv"].update({"gemma-3-12b on h100": {
        "ok": False, "stage": "validate_api_server_args", "error": "KeyError: parser"}}),
     "argv gemma-3-12b on h100: validate_api_server_args: KeyError: parser"),
    (lambda r: r["argv"].update({"qwen3-vl-30b: refused: an adapter path with a comma": {
        "ok": True, "parsed": {}}}),
     ("argv qwen3-vl-30b: refused: an adapter path with a comma: vLLM accepted what config.py "
     "refuses")),
    (lambda r: r["bodies"].__setitem__(0, {"ok": False, "stage": "CompletionRequest",
                                           "error": "ValidationError: n"}),
     ('body --warm /v1/completions {"model": "m", "prompt": "Hi", "max_tokens": 1}: '
     "CompletionRequest: ValidationError: n")),
    (lambda r: r["facts"]["float16_refused_model_types"].append("gemma4"),
     ("float16 refusals: vLLM ['gemma2', 'gemma3', 'gemma3_text', 'glm4', 'gemma4'], config.py "
     "['gemma2', 'gemma3', 'gemma3_text', 'glm4']")),
    (lambda r: r["facts"]["batch_defaults"].update(h100=4096),
     "default max_num_batched_tokens on h100: vLLM 4096, config.py 8192"),
    (lambda r: r["facts"]["kv"]["gemma-3-12b"]["sliding_blocks"].update(b200=1089),
     "sliding-window blocks per request of gemma-3-12b on b200: vLLM 1089, config.py 2049"),
    (lambda r: r["facts"]["fused_3d_moe"].append("MixtralForCausalLM"), "fused 3-D MoE"),
    (lambda r: r["facts"]["tool_parsers"].remove("hermes"), "tool parsers: vLLM"),
    (lambda r: r["facts"]["peft"].update({"use_dora": "accepted"}),
     "PEFT use_dora: vLLM accepted; adapters.py refuses it"),
])
def test_each_disagreement_is_one_failing_line(matrix, cases, edit, line):
    results = agreeing_results(matrix, cases)
    results = copy.deepcopy(results)
    edit(results)
    _good, bad = contract.compare(matrix, cases, results)
    assert len(bad) == 1 and bad[0].startswith(line), bad


def test_the_inside_half_imports_nothing_of_the_project():
    text = (ROOT / "scripts" / "vllm_contract_inside.py").read_text()
    for module in ("config", "engine", "adapters", "gateway", "checks", "bench", "plan"):
        assert f"import {module}" not in text and f"from {module}" not in text


def test_cases_are_json(cases):
    assert json.loads(json.dumps(cases)) == cases
