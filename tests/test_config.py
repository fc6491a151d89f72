"""config.py: every way a matrix file can be wrong (one exact line per problem), name
resolution, derived names, the validated-matrix cache, and the fit check over the
spec's whole matrix against figures worked out by hand below."""

import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import config

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30

# A small valid matrix; each error case below changes one thing in it.
BASE = textwrap.dedent("""\
    defaults:
      vllm_version: "0.33.0"
    gpus:
      l40s: {modal_gpu: L40S, vram_gb: 48, usd_per_hour: 1.95}
      h100: {modal_gpu: H100, vram_gb: 80, usd_per_hour: 3.95}
    models:
      tiny:
        name: org/Tiny-IT
        huggingface_id: org/tiny-it
        params_b: 1
        layers: 4
        attention_heads: 8
        kv_heads: 2
        head_dim: 64
        max_model_len: 4096
    """)

TINY_EXTRA = textwrap.indent(textwrap.dedent("""\
        huggingface_id: org/other
        params_b: 1
        layers: 4
        attention_heads: 8
        kv_heads: 2
        head_dim: 64
        max_model_len: 4096
    """), "    ")  # the rest of a model entry, under its key


def write(tmp_path: Path, text: str | bytes, name: str = "models.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def errors_of(path: Path) -> list[str]:
    with pytest.raises(config.ConfigError) as caught:
        config.load(path)
    assert caught.value.exit_code == 3
    return str(caught.value).splitlines()


def test_base_matrix_is_valid(tmp_path):
    matrix = config.load(write(tmp_path, BASE))
    assert list(matrix.gpus) == ["l40s", "h100"]
    assert matrix.models["tiny"].name == "org/Tiny-IT"


# ## Every error path, with its exact message ({f} is the file's path)

CASES = [
    (
        "malformed YAML: unclosed flow mapping",
        BASE.replace("l40s: {modal_gpu: L40S,", "l40s: {modal_gpu: L40S"),
        ["{f}: line 4, column 33: expected ',' or '}', but got ':'"],
    ),
    (
        "malformed YAML: a tab as indentation",
        BASE.replace("  vllm_version", "\tvllm_version"),
        ["{f}: line 2, column 1: found character '\\t' that cannot start any token"],
    ),
    (
        "unknown key at the top level (typo for models)",
        BASE.replace("models:", "modles:"),
        ["{f}: models: required key is missing",
         "{f}: modles: unknown key (check its spelling)"],
    ),
    (
        "unknown key in defaults",
        BASE.replace('vllm_version: "0.33.0"', 'vllm_version: "0.33.0"\n  scaledown: 60'),
        ["{f}: defaults.scaledown: unknown key (check its spelling)"],
    ),
    (
        "unknown key in a GPU",
        BASE.replace("vram_gb: 48", "vram: 48"),
        ["{f}: gpus.l40s.vram_gb: required key is missing",
         "{f}: gpus.l40s.vram: unknown key (check its spelling)"],
    ),
    (
        "unknown key in a model",
        BASE.replace("max_model_len: 4096", "max_model_len: 4096\n    max_model_length: 8192"),
        ["{f}: models.tiny.max_model_length: unknown key (check its spelling)"],
    ),
    (
        "unknown GPU in a model's gpus",
        BASE + "    gpus: [h100, h999]\n",
        ["{f}: models.tiny.gpus: unknown GPU 'h999' (defined: l40s, h100)"],
    ),
    (
        "duplicate model key",
        BASE + "  tiny:\n" + TINY_EXTRA,
        ["{f}: line 16, column 3: models: duplicate key 'tiny' (first at line 7)"],
    ),
    (
        "duplicate key inside a GPU",
        BASE.replace("vram_gb: 80,", "vram_gb: 80, vram_gb: 81,"),
        ["{f}: line 5, column 40: gpus.h100: duplicate key 'vram_gb' (first at line 5)"],
    ),
    (
        "names that collide without regard to case",
        BASE + "  other:\n    name: ORG/tiny-it\n" + TINY_EXTRA,
        [("{f}: models.other: name 'org/tiny-it' collides with model 'tiny' "
         "(names are matched without regard to case)")],
    ),
    (
        "a model's name equal to another model's key",
        BASE + "  other:\n    name: TINY\n" + TINY_EXTRA,
        [("{f}: models.other: name 'tiny' collides with model 'tiny' "
         "(names are matched without regard to case)")],
    ),
    (
        "zero VRAM",
        BASE.replace("vram_gb: 48", "vram_gb: 0"),
        ["{f}: gpus.l40s.vram_gb: Input should be greater than 0 (got 0)"],
    ),
    (
        "negative price",
        BASE.replace("usd_per_hour: 3.95", "usd_per_hour: -3.95"),
        ["{f}: gpus.h100.usd_per_hour: Input should be greater than 0 (got -3.95)"],
    ),
    (
        "a scaledown window Modal refuses",
        BASE.replace('vllm_version: "0.33.0"\n',
                     'vllm_version: "0.33.0"\n  scaledown_window_seconds: 7200\n'),
        [("{f}: defaults.scaledown_window_seconds: Input should be less than or equal to 3600 "
          "(got 7200)")],
    ),
    (
        "a request timeout over Modal's 24 hours",
        BASE.replace('vllm_version: "0.33.0"\n',
                     'vllm_version: "0.33.0"\n  request_timeout_seconds: 90000\n'),
        [("{f}: defaults.request_timeout_seconds: Input should be less than or equal to 86400 "
          "(got 90000)")],
    ),
    (
        "zero parameters and zero layers",
        BASE.replace("params_b: 1", "params_b: 0").replace("layers: 4", "layers: 0"),
        ["{f}: models.tiny.params_b: Input should be greater than 0 (got 0)",
         "{f}: models.tiny.layers: Input should be greater than 0 (got 0)"],
    ),
    (
        "a size that is not a number",
        BASE.replace("vram_gb: 48", "vram_gb: lots"),
        [("{f}: gpus.l40s.vram_gb: Input should be a valid number, "
         "unable to parse string as a number (got 'lots')")],
    ),
    (
        "gpu_memory_utilization above 1",
        BASE.replace('vllm_version: "0.33.0"',
                     'vllm_version: "0.33.0"\n  gpu_memory_utilization: 1.5'),
        [("{f}: defaults.gpu_memory_utilization: Input should be less than or equal to 1 "
         "(got 1.5)")],
    ),
    (
        "a GPU count vLLM cannot split over",
        BASE.replace("usd_per_hour: 1.95}", "usd_per_hour: 1.95, max_count: 3}"),
        ["{f}: gpus.l40s.max_count: Input should be 1, 2, 4 or 8 (got 3)"],
    ),
    (
        "a dtype vLLM does not take",
        BASE.replace("max_model_len: 4096", "max_model_len: 4096\n    dtype: bf16"),
        ["{f}: models.tiny.dtype: Input should be 'bfloat16' or 'float16' (got 'bf16')"],
    ),
    (
        "float16 for a model type vLLM 0.33 refuses it for (config/model.py)",
        BASE.replace("max_model_len: 4096", "max_model_len: 4096\n    dtype: float16\n"
                     "    model_type: gemma3"),
        [("{f}: models.tiny.dtype: vLLM 0.33 refuses float16 for model_type gemma3 "
          "(numerical instability) and would exit at start; use bfloat16")],
    ),
    (
        "float16 without the model_type that decides whether vLLM takes it",
        BASE.replace("max_model_len: 4096", "max_model_len: 4096\n    dtype: float16"),
        [("{f}: models.tiny.model_type: required with dtype float16 (config.json's model_type: "
          "vLLM 0.33 refuses float16 for gemma2, gemma3, gemma3_text, glm4)")],
    ),
    (
        "a tool parser vLLM 0.33 does not have (tool_parsers/__init__.py)",
        BASE.replace("max_model_len: 4096", "max_model_len: 4096\n    tool_parser: hermes2"),
        [("{f}: models.tiny.tool_parser: 'hermes2' is not a tool parser of vLLM 0.33, which "
          "would exit at start (e.g. hermes, pythonic, llama3_json; or add --tool-parser-plugin "
          "to extra_args)")],
    ),
    (
        "missing required key in a model",
        BASE.replace("    huggingface_id: org/tiny-it\n", ""),
        ["{f}: models.tiny.huggingface_id: required key is missing"],
    ),
    (
        "missing defaults section",
        BASE.replace('defaults:\n  vllm_version: "0.33.0"\n', ""),
        ["{f}: defaults: required key is missing"],
    ),
    (
        "a model that is not a mapping",
        BASE + "  broken: [1, 2]\n",
        ["{f}: models.broken: expected a mapping"],
    ),
    (
        "no GPUs and no models",
        'defaults: {vllm_version: "0.33.0"}\ngpus: {}\nmodels: {}\n',
        ["{f}: gpus: define at least one entry", "{f}: models: define at least one entry"],
    ),
    (
        "a key with capitals",
        BASE.replace("  tiny:", "  Tiny:"),
        ["{f}: models.Tiny: keys are lower-case letters, digits, '.' and '-'"],
    ),
    (
        "legacy-key ambiguity: a model key that reads as <model>-<gpu>",
        BASE + "  tiny-h100:\n" + TINY_EXTRA,
        [("{f}: models.tiny-h100: key reads as model 'tiny' on GPU 'h100'; "
         "rename it so legacy keys stay unambiguous")],
    ),
    (
        "more sliding-window layers than layers, more KV heads than heads",
        BASE.replace("kv_heads: 2", "kv_heads: 16\n    sliding_window: {layers: 4, window: 512}"),
        ["{f}: models.tiny.sliding_window.layers: must be fewer than layers (4)",
         "{f}: models.tiny.kv_heads: cannot exceed attention_heads (8)"],
    ),
    (
        "a document that is a list",
        "- l40s\n- h100\n",
        ["{f}: expected a mapping with defaults, gpus and models"],
    ),
    (
        "an empty file",
        "",
        ["{f}: expected a mapping with defaults, gpus and models"],
    ),
    (
        "not UTF-8",
        b"defaults: {vllm_version: \xff}\n",
        ["{f}: not UTF-8 text"],
    ),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_config_error_is_one_exact_line_per_problem(tmp_path, text, expected):
    path = write(tmp_path, text)
    assert errors_of(path) == [line.replace("{f}", str(path)) for line in expected]


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3", "gemma3_text", "glm4"])
def test_float16_is_refused_for_each_family_vllm_refuses_it_for(tmp_path, model_type):
    # vllm/config/model.py _FLOAT16_NOT_SUPPORTED_MODELS, checked by _check_valid_dtype at
    # start: exit 3 and one line naming the field, through the CLI too.
    path = write(tmp_path, BASE.replace("max_model_len: 4096", "max_model_len: 4096\n"
                                        f"    dtype: float16\n    model_type: {model_type}"))
    line = (f"{path}: models.tiny.dtype: vLLM 0.33 refuses float16 for model_type {model_type} "
            "(numerical instability) and would exit at start; use bfloat16")
    assert errors_of(path) == [line]
    from typer.testing import CliRunner

    import deploy

    result = CliRunner().invoke(deploy.cli, ["--list", "--config", str(path)])
    assert (result.exit_code, result.stderr) == (3, f"Error: {line}\n")


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma", "gemma3n", "glm4v"])
def test_float16_is_taken_for_other_families(tmp_path, model_type):
    path = write(tmp_path, BASE.replace("max_model_len: 4096", "max_model_len: 4096\n"
                                        f"    dtype: float16\n    model_type: {model_type}"))
    assert config.load(path).models["tiny"].dtype == "float16"


def test_a_plugin_tool_parser_is_taken_with_its_plugin(tmp_path):
    path = write(tmp_path, BASE.replace("max_model_len: 4096", "max_model_len: 4096\n"
                                        "    tool_parser: mine\n"
                                        "    extra_args: [--tool-parser-plugin, /p/mine.py]"))
    assert config.load(path).models["tiny"].tool_parser == "mine"


def test_several_problems_in_one_file_give_several_lines(tmp_path):
    text = (BASE.replace("vram_gb: 48", "vram_gb: -1")
            .replace("usd_per_hour: 3.95", "usd_per_hour: 0")
            .replace("head_dim: 64", "head_dim: 64\n    colour: blue"))
    path = write(tmp_path, text)
    assert errors_of(path) == [
        f"{path}: gpus.l40s.vram_gb: Input should be greater than 0 (got -1)",
        f"{path}: gpus.h100.usd_per_hour: Input should be greater than 0 (got 0)",
        f"{path}: models.tiny.colour: unknown key (check its spelling)",
    ]


def test_several_duplicates_are_all_reported(tmp_path):
    text = BASE + "  tiny:\n" + TINY_EXTRA + "gpus: {}\n"
    path = write(tmp_path, text)
    assert errors_of(path) == [  # in the order of the file
        f"{path}: line 16, column 3: models: duplicate key 'tiny' (first at line 7)",
        f"{path}: line 24, column 1: (top level): duplicate key 'gpus' (first at line 3)",
    ]


def test_unhashable_key_is_an_error_not_a_crash(tmp_path):
    path = write(tmp_path, "{[1, 2]: x}\n")
    assert errors_of(path) == [f"{path}: line 1, column 2: found unhashable key"]


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_unreadable_file(tmp_path, kind):
    path = tmp_path / "nowhere.yaml"
    reason = "No such file or directory"
    if kind == "directory":
        path.mkdir()
        reason = "Is a directory"
    assert errors_of(path) == [f"{path}: cannot read: {reason}"]


def test_the_repository_matrix_is_valid():
    matrix = config.load()
    assert list(matrix.gpus) == ["l40s", "a100", "h100", "h200", "b200"]
    assert list(matrix.models) == ["gemma-3-12b", "gemma-3-27b", "qwen3-vl-30b"]


# ## Names: lookup in any case, derived app names


@pytest.mark.parametrize("name", [
    "gemma-3-27b", "GEMMA-3-27B", "google/gemma-3-27b-it", "Google/Gemma-3-27B-IT",
    "  gemma-3-27b ",
])
def test_model_lookup_by_key_name_or_hf_id_in_any_case(name):
    assert config.load().resolve_model(name).key == "gemma-3-27b"


def test_model_lookup_of_qwen_by_its_mixed_case_name():
    matrix = config.load()
    assert matrix.resolve_model("qwen/qwen3-vl-30b-a3b-instruct").key == "qwen3-vl-30b"
    assert matrix.resolve_model("Qwen/Qwen3-VL-30B-A3B-Instruct").key == "qwen3-vl-30b"


def test_unknown_model_lists_the_valid_ones():
    with pytest.raises(config.UsageError) as caught:
        config.load().resolve_model("llama-3")
    assert str(caught.value) == (
        "unknown model 'llama-3'; valid models: gemma-3-12b, gemma-3-27b, qwen3-vl-30b"
    )
    assert caught.value.exit_code == 2


def test_unknown_gpu_lists_the_valid_ones():
    matrix = config.load()
    assert matrix.gpu("H100").modal_gpu == "H100"
    with pytest.raises(config.UsageError) as caught:
        matrix.gpu("a10g")
    assert str(caught.value) == "unknown GPU 'a10g'; valid GPU keys: l40s, a100, h100, h200, b200"


def test_derived_names():
    assert config.gpu_app_name("h100") == "vllm-h100"
    assert config.legacy_key("gemma-3-12b", "l40s") == "gemma-3-12b-l40s"
    assert config.legacy_app_name("gemma-3-12b", "l40s") == "vllm-gemma-3-12b-l40s"
    assert config.endpoint_url_pattern("vllm-h100") == (
        "https://<workspace>--vllm-h100-serve.modal.run"
    )


def test_legacy_key_parses_to_its_cell_in_any_case():
    fit = config.load().parse_legacy_key("Qwen3-VL-30B-L40S")
    assert (fit.model.key, fit.gpu.key, fit.gpu_string) == ("qwen3-vl-30b", "l40s", "L40S:2")


def test_unknown_legacy_key_names_the_models_and_gpus():
    with pytest.raises(config.UsageError) as caught:
        config.load().parse_legacy_key("llama-3-h100")
    assert str(caught.value) == (
        "unknown model-GPU key 'llama-3-h100'; expected <model>-<gpu> with models "
        "gemma-3-12b, gemma-3-27b, qwen3-vl-30b and GPUs l40s, a100, h100, h200, b200 "
        "(e.g. gemma-3-12b-l40s, gemma-3-12b-a100, gemma-3-12b-h100, gemma-3-12b-h200, "
        "gemma-3-12b-b200)"
    )


# ## The validated-matrix cache


def _imports_after_load(path: Path, cache_dir: Path) -> list[str]:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import config; config.load(sys.argv[2]); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'yaml', 'pydantic', 'pydantic_core', 'annotated_types'}))"
    )
    env = {**os.environ, "MODAL_VLLM_CACHE_DIR": str(cache_dir)}
    out = subprocess.run([sys.executable, "-c", code, str(ROOT), str(path)], env=env,
                         capture_output=True, text=True, check=True, timeout=60)
    return eval(out.stdout)  # a printed list of names


def test_second_load_reads_the_cache_without_yaml_or_pydantic(tmp_path):
    path = write(tmp_path, BASE)
    cache_dir = tmp_path / "cache"
    first = _imports_after_load(path, cache_dir)
    assert first == ["annotated_types", "pydantic", "pydantic_core", "yaml"]
    assert len(list(cache_dir.glob("matrix-*.pickle"))) == 1
    assert _imports_after_load(path, cache_dir) == []


def test_an_edited_file_is_validated_again(tmp_path):
    path = write(tmp_path, BASE)
    assert config.load(path).gpus["l40s"].vram_gb == 48
    path.write_text(BASE.replace("vram_gb: 48", "vram_gb: 46"))
    assert config.load(path).gpus["l40s"].vram_gb == 46
    path.write_text(BASE.replace("vram_gb: 48", "vram_gb: -46"))
    assert errors_of(path) == [
        f"{path}: gpus.l40s.vram_gb: Input should be greater than 0 (got -46)"
    ]


def test_the_cache_keeps_the_path_it_was_loaded_from(tmp_path):
    first, second = write(tmp_path, BASE, "a.yaml"), write(tmp_path, BASE, "b.yaml")
    assert config.load(first).path == first
    assert config.load(second).path == second  # same bytes: read from the cache


@pytest.mark.parametrize("junk", [b"", b"not a pickle", pickle.dumps({"gpus": {}}),
                                  pickle.dumps((b"key", "not a matrix")),
                                  b"\x80\x05\x95garbage", pickle.dumps(config.Defaults)[:-3]])
def test_a_corrupt_cache_file_is_ignored(tmp_path, junk):
    path = write(tmp_path, BASE)
    config.load(path)
    (cache,) = Path(os.environ["MODAL_VLLM_CACHE_DIR"]).glob("matrix-*.pickle")
    cache.write_bytes(junk)
    assert list(config.load(path).models) == ["tiny"]
    key, matrix = pickle.loads(cache.read_bytes())  # rewritten
    assert key.endswith(BASE.encode()) and isinstance(matrix, config.Matrix)


def test_a_cache_file_for_other_bytes_is_never_used(tmp_path):
    # As if two files' checksums collided: the name matches, the stored bytes do not.
    other = config.load(write(tmp_path, BASE.replace("vram_gb: 48", "vram_gb: 46"), "o.yaml"))
    path = write(tmp_path, BASE)
    config.load(path)
    (cache,) = [c for c in Path(os.environ["MODAL_VLLM_CACHE_DIR"]).glob("matrix-*.pickle")
                if pickle.loads(c.read_bytes())[1].gpus["l40s"].vram_gb == 48]
    key, _ = pickle.loads(cache.read_bytes())
    cache.write_bytes(pickle.dumps((key.replace(b"vram_gb: 48", b"vram_gb: 46"), other)))
    assert config.load(path).gpus["l40s"].vram_gb == 48


def test_an_unwritable_cache_only_costs_speed(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("MODAL_VLLM_CACHE_DIR", str(blocker / "cache"))  # under a file
    assert list(config.load(write(tmp_path, BASE)).models) == ["tiny"]


# ## Fit check over the spec's matrix, worked out by hand
#
# As vLLM 0.33 sizes it (config.fit_on_gpu, v1/core/kv_cache_planning.py
# get_kv_cache_configs), per GPU of a replica of `count` GPUs, with GB = 1e9 bytes,
# gpu_memory_utilization 0.92 and 3 GiB of overhead per GPU, `count` GPUs fit when
#   weights / count + 3 GiB + bytes per block x (blocks per request + 1 null block)
#     <= VRAM x 0.92,
# and vLLM's KV cache size in tokens is
#   blocks = (VRAM x 0.92 - weights / count - 3 GiB) // bytes per block
#   kv_tokens = int(blocks / blocks per request x max_model_len).
# A block holds 16 tokens (CacheConfig.DEFAULT_BLOCK_SIZE) of K and V, 2 bytes each, for the
# layers of one KV cache group. A request at max_model_len 32768 takes 32768 / 16 = 2048
# blocks in a full-attention group, and in a sliding-window group
#   cdiv(min(window - 1 + 2 x max_num_batched_tokens, 32768), 16) + 1
# (SlidingWindowSpec.max_admission_blocks_per_request; 2 batches in flight: async
# scheduling, VllmConfig.max_in_flight_tokens). vLLM's default max_num_batched_tokens
# (EngineArgs.get_batch_defaults): 2048 on L40S and A100, 8192 on H100 and H200, 16384
# on B200. With window 1024, a sliding group's blocks per request are:
#   L40S, A100: min(1023 + 4096, 32768) = 5119 tokens -> cdiv 320 + 1 = 321
#   H100, H200: min(1023 + 16384, 32768) = 17407 -> 1088 + 1 = 1089
#   B200:       min(1023 + 32768, 32768) = 32768 -> 2048 + 1 = 2049
SLIDING_BLOCKS = {"l40s": 321, "a100": 321, "h100": 1089, "h200": 1089, "b200": 2049}
# Budgets per GPU: L40S 48e9 x 0.92 = 44.16e9; A100/H100 80e9 x 0.92 = 73.6e9;
# H200 141e9 x 0.92 = 129.72e9; B200 192e9 x 0.92 = 176.64e9 (integers below: exact).
BUDGET = {"l40s": 4416 * 10**7, "a100": 7360 * 10**7, "h100": 7360 * 10**7,
          "h200": 12972 * 10**7, "b200": 17664 * 10**7}
OVERHEAD = 3 * GIB  # 3,221,225,472 bytes per GPU
LENGTH = 32768

# gemma-3-12b: 12.19e9 params x 2 bytes = 24.38e9 of weights. A layer's block:
#   16 x 2 (K, V) x 8 kv heads x 256 dim x 2 bytes = 131,072 bytes. 8 full-attention and 40
#   sliding layers: groups of 8 layers (the smaller count; 40 is not under 1.5 x 8), so 1
#   full group and 5 sliding groups, 8 x 131,072 = 1,048,576 bytes per block.
#   Blocks per request: L40S 2048 + 5 x 321 = 3653; H100 2048 + 5 x 1089 = 7493;
#   B200 2048 + 5 x 2049 = 12293. One GPU everywhere: on L40S 24.38e9 + 3.22e9 +
#   1,048,576 x 3654 = 31.43e9 <= 44.16e9.
G12 = (24_380_000_000, 8 * 131_072, 5)  # weights, bytes per block, sliding groups
# gemma-3-27b: 27.43e9 x 2 = 54.86e9, more than one L40S's 44.16e9: 2 GPUs there (32 heads
#   divide by 2), each with 27.43e9 of weights and 16 / 2 = 8 kv heads: a layer's block is
#   16 x 2 x 8 x 128 x 2 = 65,536 bytes (131,072 on one GPU). 10 full and 52 sliding layers:
#   groups of 10, 1 full and cdiv(52, 10) = 6 sliding groups (the last padded), 10 layers'
#   pages per block. Blocks per request: 2048 + 6 x 321 = 3974 (L40S, A100),
#   2048 + 6 x 1089 = 8582 (H100, H200), 2048 + 6 x 2049 = 14342 (B200).
#   L40S:2, per GPU: 27.43e9 + 3.22e9 + 655,360 x 3975 = 33.26e9 <= 44.16e9.
#   H100: 54.86e9 + 3.22e9 + 1,310,720 x 8583 = 69.33e9 <= 73.6e9: one GPU.
G27 = (54_860_000_000, 10 * 131_072, 6)
# qwen3-vl-30b: 31.07e9 x 2 = 62.14e9 of weights, full attention only: one group of all 48
#   layers, a layer's block 16 x 2 x 4 kv heads x 128 x 2 = 32,768 bytes (16,384 per GPU on
#   2 GPUs), 48 x 32,768 = 1,572,864 bytes per block, 2048 blocks per request.
#   L40S:2, per GPU: 31.07e9 + 3.22e9 + 786,432 x 2049 = 35.90e9 <= 44.16e9.
#   80 GB: 62.14e9 + 3.22e9 + 1,572,864 x 2049 = 68.58e9 <= 73.6e9: one GPU.
QWEN = (62_140_000_000, 48 * 32_768, 0)


def kv_tokens(gpu: str, count: int, model: tuple[int, int, int]) -> int:
    weights, bytes_per_block, sliding_groups = model
    blocks = (BUDGET[gpu] - weights // count - OVERHEAD) // (bytes_per_block // count)
    per_request = 2048 + sliding_groups * SLIDING_BLOCKS[gpu]
    return int(blocks / per_request * LENGTH)


# Price per running replica (config.Fit.bill): the GPUs, plus what it reserves at Modal's
# $0.04716 per core-hour and $0.007992 per GiB-hour (models.yaml billing):
#   CPU: 2 cores (API server, engine core) + 1 per GPU + 1 (vision: all three models)
#   memory: 8 GiB + 6 GiB per GPU
# One GPU: 4 cores x 0.04716 = $0.18864, 14 GiB x 0.007992 = $0.111888 (+ $0.300528)
# Two GPUs: 5 cores = $0.2358, 20 GiB = $0.15984 (+ $0.39564)
EXTRA = {1: (0.18864, 0.111888), 2: (0.2358, 0.15984)}


SPEC_FITS = [
    # (model, gpu, GPUs per replica, Modal GPU string, KV tokens)
    ("gemma-3-12b", "l40s", 1, "L40S", kv_tokens("l40s", 1, G12)),
    ("gemma-3-12b", "a100", 1, "A100-80GB", kv_tokens("a100", 1, G12)),
    ("gemma-3-12b", "h100", 1, "H100", kv_tokens("h100", 1, G12)),
    ("gemma-3-12b", "h200", 1, "H200", kv_tokens("h200", 1, G12)),
    ("gemma-3-12b", "b200", 1, "B200", kv_tokens("b200", 1, G12)),
    ("gemma-3-27b", "l40s", 2, "L40S:2", kv_tokens("l40s", 2, G27)),
    ("gemma-3-27b", "a100", 1, "A100-80GB", kv_tokens("a100", 1, G27)),
    ("gemma-3-27b", "h100", 1, "H100", kv_tokens("h100", 1, G27)),
    ("gemma-3-27b", "h200", 1, "H200", kv_tokens("h200", 1, G27)),
    ("gemma-3-27b", "b200", 1, "B200", kv_tokens("b200", 1, G27)),
    ("qwen3-vl-30b", "l40s", 2, "L40S:2", kv_tokens("l40s", 2, QWEN)),
    ("qwen3-vl-30b", "a100", 1, "A100-80GB", kv_tokens("a100", 1, QWEN)),
    ("qwen3-vl-30b", "h100", 1, "H100", kv_tokens("h100", 1, QWEN)),
    ("qwen3-vl-30b", "h200", 1, "H200", kv_tokens("h200", 1, QWEN)),
    ("qwen3-vl-30b", "b200", 1, "B200", kv_tokens("b200", 1, QWEN)),
]


def test_hand_figures_as_plain_numbers():
    # The expressions above, evaluated once by hand as a check on the check. E.g.
    # gemma-3-12b on L40S: (44.16e9 - 24.38e9 - 3 GiB) // 1,048,576 = 15,791 blocks;
    # 15,791 / 3653 x 32768 = 141,647 tokens (4.3 requests of 32k at once). On H100 the
    # larger batch budget keeps more of each sliding window: 43,867 / 7493 x 32768 = 191,836.
    assert [row[4] for row in SPEC_FITS] == [
        141_647, 393_494, 191_836, 425_892, 378_869,
        169_958, 97_619, 45_203, 208_688, 206_663,
        200_768, 83_808, 83_808, 654_688, 1_131_984,
    ]


@pytest.mark.parametrize(("model", "gpu", "count", "gpu_string", "kv_tokens"), SPEC_FITS,
                         ids=[f"{m}-{g}" for m, g, *_ in SPEC_FITS])
def test_fit_of_every_cell_of_the_spec_matrix(model, gpu, count, gpu_string, kv_tokens):
    matrix = config.load()
    fit = matrix.fit(matrix.models[model], matrix.gpus[gpu])
    assert (fit.fits, fit.count, fit.gpu_string, fit.kv_tokens, fit.reason) == (
        True, count, gpu_string, kv_tokens, "")
    cpu, memory = EXTRA[count]
    gpus = matrix.gpus[gpu].usd_per_hour * count
    assert fit.usd_per_hour_split == pytest.approx({"gpu": gpus, "cpu": cpu, "memory": memory})
    assert fit.usd_per_hour == pytest.approx(gpus + cpu + memory)
    bill = fit.bill()
    assert (bill.cpu_cores, bill.memory_mib) == ({1: 4.0, 2: 5.0}[count],
                                                 {1: 14 * 1024, 2: 20 * 1024}[count])


def test_every_cells_price_as_plain_numbers(matrix):
    # GPU $/hour x GPUs + 0.300528 (one GPU) or + 0.39564 (two), rounded as --list shows them.
    prices = [round(matrix.fit(m, g).usd_per_hour, 4) for m in matrix.models.values()
              for g in matrix.gpus.values()]
    assert prices == [2.2505, 2.8005, 4.2505, 4.8405, 6.5505,
                      4.2956, 2.8005, 4.2505, 4.8405, 6.5505,
                      4.2956, 2.8005, 4.2505, 4.8405, 6.5505]


def test_need_of_the_tightest_cells_by_hand(matrix):
    # gemma-3-27b on H100: 54.86e9 + 3 GiB + 1,310,720 x (8582 + 1) = 69,331,135,232 bytes.
    fit = matrix.fit(matrix.models["gemma-3-27b"], matrix.gpus["h100"])
    assert fit.need_gib * GIB == pytest.approx(54_860_000_000 + OVERHEAD + 1_310_720 * 8583)
    # B200 keeps 2049 blocks per sliding group: 54.86e9 + 3 GiB + 1,310,720 x 14343.
    fit = matrix.fit(matrix.models["gemma-3-27b"], matrix.gpus["b200"])
    assert fit.need_gib * GIB == pytest.approx(54_860_000_000 + OVERHEAD + 1_310_720 * 14343)
    # The sliding layers' share there: 6 groups x 1,310,720 x 2049 = 16,113,991,680 bytes,
    # where the window's 1024 tokens (2 x 52 x 16 x 128 x 2 x 1024 = 436,207,616) were
    # counted before: 15,677,784,064 bytes (14.6 GiB) more.
    assert 6 * 1_310_720 * 2049 - 2 * 52 * 16 * 128 * 2 * 1024 == 15_677_784_064


def test_the_router_costs_its_core_and_gib(matrix):
    # 1 core x 0.04716 + 1 GiB x 0.007992 = $0.055152 per hour while it is up.
    assert matrix.router_bill.usd_per_hour == pytest.approx(0.055152)


def test_the_spec_matrix_has_15_legacy_cells():
    assert len(config.load().legacy_cells()) == 15


def test_gemma_27b_on_one_l40s_would_not_fit():
    # 54.86e9 of weights alone exceed one L40S's 44.16e9 budget.
    assert G27[0] > BUDGET["l40s"]


# ## vLLM's default batch budget per GPU, and what overrides it


@pytest.mark.parametrize(("gpu", "tokens"), [
    ("l40s", 2048), ("a100", 2048), ("h100", 8192), ("h200", 8192), ("b200", 16384)])
def test_default_max_num_batched_tokens_follows_vllm(matrix, gpu, tokens):
    # engine/arg_utils.py get_batch_defaults: >= 160 GiB -> 16384; >= 70 GiB and not an A100
    # -> 8192; else 2048. Nominal VRAM: 48e9 = 44.7 GiB, 80e9 = 74.5, 141e9 = 131.3,
    # 192e9 = 178.8.
    assert matrix.gpus[gpu].default_max_num_batched_tokens == tokens


def test_an_explicit_batch_budget_in_extra_args_is_what_vllm_runs_with(tmp_path):
    text = (ROOT / "models.yaml").read_text().replace(
        "    max_model_len: 32768\n    vision: {images: 4, videos: 0}\n\n  gemma-3-27b:",
        "    max_model_len: 32768\n    vision: {images: 4, videos: 0}\n"
        "    extra_args: [--max-num-batched-tokens, '512']\n\n  gemma-3-27b:", 1)
    matrix = config.load(write(tmp_path, text))
    fit = matrix.fit(matrix.models["gemma-3-12b"], matrix.gpus["b200"])
    # min(1023 + 2 x 512, 32768) = 2047 tokens -> cdiv 128 + 1 = 129 blocks per sliding group;
    # 2048 + 5 x 129 = 2693 blocks per request; (176.64e9 - 24.38e9 - 3 GiB) // 1 MiB = 142,134.
    assert fit.kv_tokens == int(142_134 / 2693 * 32768) == 1_729_464


# ## Models that fit nowhere, or whose heads rule out a tensor-parallel size

BIG_MODELS = BASE + textwrap.indent(textwrap.dedent("""\
      huge:
        huggingface_id: org/huge
        params_b: 1000
        layers: 10
        attention_heads: 8
        kv_heads: 8
        head_dim: 128
        max_model_len: 4096
      six-heads:
        huggingface_id: org/six-heads
        params_b: 30
        layers: 10
        attention_heads: 6
        kv_heads: 2
        head_dim: 128
        max_model_len: 4096
      twelve-heads:
        huggingface_id: org/twelve-heads
        params_b: 60
        layers: 10
        attention_heads: 12
        kv_heads: 4
        head_dim: 128
        max_model_len: 4096
      h100-only:
        huggingface_id: org/h100-only
        params_b: 1
        layers: 4
        attention_heads: 8
        kv_heads: 2
        head_dim: 64
        max_model_len: 4096
        gpus: [h100]
    """), "  ")


@pytest.fixture
def big(tmp_path):
    return config.load(write(tmp_path, BIG_MODELS))


def test_a_model_too_big_for_8_gpus_is_marked_with_its_reason(big):
    fit = big.fit(big.models["huge"], big.gpus["h100"])
    # 1000e9 x 2 bytes + 8 x 3 GiB + KV: on 8 GPUs one kv head each, a block of 10 layers
    # is 10 x 16 x 2 x 1 x 128 x 2 = 81,920 bytes, x (4096 / 16 + 1 null) blocks, per GPU:
    need_gib = (1000 * 10**9 * 2 + 8 * OVERHEAD + 8 * 81_920 * 257) / GIB
    assert f"{need_gib:.1f}" == "1886.8"
    assert (fit.fits, fit.count, fit.gpu_string, fit.kv_tokens) == (False, 0, "", 0)
    assert fit.reason == ("needs 1886.8 GiB at max_model_len 4096, "
                          "more than 8 x 80 GB x 0.92 allows")


def test_a_model_that_fits_nowhere_is_never_deployed(big):
    import plan

    cells = {(f.model.key, f.gpu.key) for f in big.legacy_cells()}
    assert not any(model == "huge" for model, _ in cells)
    for app in plan.all_gpu_apps(big):
        assert "huge" not in [p.model.key for p in app.pools]
        assert "huge" in [f.model.key for f in app.skipped]
    with pytest.raises(config.UsageError) as caught:
        plan.legacy_app(big, "huge-l40s")
    assert str(caught.value) == ("huge-l40s cannot be deployed: needs 1886.8 GiB at "
                                 "max_model_len 4096, more than 8 x 48 GB x 0.92 allows")


def test_heads_not_divisible_by_4_or_8_stop_at_2_gpus(big):
    model = big.models["six-heads"]
    # 30e9 x 2 = 60e9 of weights. H100: one GPU's 73.6e9 holds 60e9 + 3 GiB + KV (a block
    # of 10 layers x 16 x 2 x 2 x 128 x 2 = 163,840 bytes x 257 = 42,106,880) = 63.26e9.
    assert big.fit(model, big.gpus["h100"]).gpu_string == "H100"
    # L40S: 2 GPUs give 88.32e9, enough (60e9 + 6.44e9 + 0.04e9 = 66.49e9): 2 GPUs.
    assert big.fit(model, big.gpus["l40s"]).gpu_string == "L40S:2"


def test_heads_not_divisible_by_4_fail_where_4_gpus_were_needed(tmp_path):
    text = BIG_MODELS.replace("l40s: {modal_gpu: L40S, vram_gb: 48, usd_per_hour: 1.95}",
                              "l4: {modal_gpu: L4, vram_gb: 24, usd_per_hour: 0.80}")
    matrix = config.load(write(tmp_path, text))
    fit = matrix.fit(matrix.models["six-heads"], matrix.gpus["l4"])
    # L4 budget 24e9 x 0.92 = 22.08e9 per GPU; 2 GPUs = 44.16e9 < 60e9 + 2 x 3 GiB + 0.04e9.
    # 4 (and 8) GPUs would fit, but 6 heads cannot be split 4 or 8 ways.
    need_gib = (30 * 10**9 * 2 + 2 * OVERHEAD + 2 * 81_920 * 257) / GIB  # 1 kv head per GPU
    assert (fit.fits, fit.count) == (False, 0)
    assert fit.reason == (
        f"needs {need_gib:.1f} GiB at max_model_len 4096, more than 2 x 24 GB x 0.92 allows "
        "(tensor-parallel size 4 or 8 does not divide its 6 attention heads)"
    )
    cells = [(f.model.key, f.gpu.key) for f in matrix.legacy_cells()]
    assert ("six-heads", "l4") not in cells
    assert ("six-heads", "h100") in cells


def test_heads_divisible_by_4_not_8_take_4_gpus(tmp_path):
    text = BIG_MODELS.replace("l40s: {modal_gpu: L40S, vram_gb: 48, usd_per_hour: 1.95}",
                              "l4: {modal_gpu: L4, vram_gb: 24, usd_per_hour: 0.80}")
    matrix = config.load(write(tmp_path, text))
    # 60e9 x 2 = 120e9 of weights: 4 x 22.08e9 = 88.32e9 is too little, 8 GPUs would hold
    # it, but 12 heads do not split 8 ways.
    fit = matrix.fit(matrix.models["twelve-heads"], matrix.gpus["l4"])
    assert (fit.fits, fit.count) == (False, 0)
    assert fit.reason.endswith("more than 4 x 24 GB x 0.92 allows (tensor-parallel size 8 "
                               "does not divide its 12 attention heads)")
    # On H100 (73.6e9 each) 2 GPUs = 147.2e9 hold 120e9 + 6.44e9 + KV: H100:2.
    assert matrix.fit(matrix.models["twelve-heads"], matrix.gpus["h100"]).gpu_string == "H100:2"


def test_a_model_restricted_to_some_gpus(big):
    model = big.models["h100-only"]
    assert big.fit(model, big.gpus["h100"]).fits
    fit = big.fit(model, big.gpus["l40s"])
    assert (fit.fits, fit.reason) == (False, "l40s not in the model's gpus")


def test_the_readme_example_entry_is_a_valid_model(tmp_path):
    readme = (ROOT / "README.md").read_text()
    block = readme.split("### Adding a model", 1)[1].split("```yaml\n", 1)[1].split("```")[0]
    entry = block.split("models:\n", 1)[1]
    matrix = config.load(write(tmp_path, (ROOT / "models.yaml").read_text() + entry))
    (key,) = set(matrix.models) - {"gemma-3-12b", "gemma-3-27b", "qwen3-vl-30b"}
    assert all(matrix.fit(matrix.models[key], gpu).fits for gpu in matrix.gpus.values())


# ## What the shipped matrix records


def test_the_shipped_matrix_records_modals_rates_with_date_and_source():
    import yaml

    raw = yaml.safe_load((ROOT / "models.yaml").read_text())
    assert set(raw["billing"]) == {"cpu_core_usd_per_hour", "memory_gib_usd_per_hour",
                                   "read_on", "source"}
    # $0.0000131 per core-second and $0.00000222 per GiB-second, by the hour.
    assert raw["billing"]["cpu_core_usd_per_hour"] == pytest.approx(0.0000131 * 3600)
    assert raw["billing"]["memory_gib_usd_per_hour"] == pytest.approx(0.00000222 * 3600)
    assert raw["billing"]["source"].startswith("https://")
    # A matrix without the section falls back to the same figures.
    assert config.load().billing == config.Billing()


def test_every_shipped_model_says_its_architecture_and_model_type():
    models = config.load().models.values()
    assert [(m.architecture, m.model_type) for m in models] == [
        ("Gemma3ForConditionalGeneration", "gemma3"),
        ("Gemma3ForConditionalGeneration", "gemma3"),
        ("Qwen3VLMoeForConditionalGeneration", "qwen3_vl_moe")]
