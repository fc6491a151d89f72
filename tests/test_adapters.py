"""LoRA adapters: the matrix entries, their GPU memory, the vLLM flags, the Volume, the upload."""

import json
from pathlib import Path
from unittest import mock

import pytest
from test_cloud import sdk, token  # noqa: F401 - the Modal SDK fakes, as pytest fixtures
from typer.testing import CliRunner

import adapters
import config
import deploy
import engine
import plan
import vllm_gpu_server

QWEN_LORA = """    tool_parser: hermes
    adapters:
      - {name: python, rank: 32, path: qwen3-vl-30b/python}
      - {name: math, rank: 20, path: qwen3-vl-30b/math}
"""


def matrix_with(tmp_path: Path, block: str = QWEN_LORA, *, edit=lambda text: text) -> config.Matrix:
    text = edit(config.DEFAULT_PATH.read_text().replace("    tool_parser: hermes\n", block))
    path = tmp_path / "models.yaml"
    path.write_text(text)
    return config.load(path)


# ## LoRA buffers as vLLM 0.33 allocates them (lora/layers/*.py create_lora_weights)
#
# Qwen3-VL-30B-A3B (its text_config): h = 2048, 32 heads x 128 = q 4096, 4 kv heads x 128 =
# kv 512, 48 layers, every MLP a MoE of E = 128 experts of I = 768. Per slot, rank r, layer
# and GPU of a tensor-parallel size t, in elements / r:
#   attention q, k, v (column-parallel: A whole, B split): 3h + (q + 2kv) / t
#             o (row-parallel: A split, B whole):           q / t + h
#     t = 1: 4 x 2048 + 2 x 4096 + 2 x 512 = 17,408
#   experts, fused 3-D (Qwen3VLMoeForConditionalGeneration.is_3d_moe_weight, so
#   FusedMoE3DWithLoRA): w13 A h, w13 B 2I / t, w2 A I / t, w2 B h = E x (2h + 3I / t)
#     t = 1: 128 x (4096 + 2304) = 819,200
#   router gate (a ReplicatedLinear, whole on every GPU): h + E = 2,176
# -> 838,784 per layer on one GPU; in bytes: x slots x r x 2 (bf16) x 48 layers.
QWEN_PER_LAYER = 17_408 + 819_200 + 2_176
# On 2 GPUs, per GPU: attention 8192 + 4096 + 2 x 256 (2 kv heads each) = 12,800; experts
# 128 x (4096 + 3 x 384) = 671,744; gate 2,176: 686,720 per GPU, 1,373,440 for the two.
QWEN_PER_LAYER_TP2 = 2 * (12_800 + 671_744 + 2_176)


def test_adapters_are_read_and_sized(tmp_path):
    qwen = matrix_with(tmp_path).models["qwen3-vl-30b"]
    assert [(a.name, a.rank, a.path) for a in qwen.adapters] == [
        ("python", 32, "qwen3-vl-30b/python"), ("math", 20, "qwen3-vl-30b/math")]
    assert qwen.lora_rank == 32  # vLLM takes 1, 8, 16, 32, ...: 32 holds both
    assert qwen.loras_on_gpu == 2
    assert QWEN_PER_LAYER == 838_784 and QWEN_PER_LAYER_TP2 == 1_373_440
    # 2 slots x rank 32 x 2 bytes x 48 layers = 6144 bytes per unit of the sums above.
    assert qwen.lora_bytes(1) == 6144 * 838_784 == 5_153_488_896
    assert qwen.lora_bytes(2) == 6144 * 1_373_440 == 8_438_415_360


def test_the_readme_moe_example_needs_two_gpus_where_one_was_judged_enough(tmp_path):
    """The README's example (2 slots at rank 64): 10.3 GB of LoRA buffers, not 3.9 GB."""
    block = QWEN_LORA.replace("rank: 20", "rank: 64") + "    max_loras: 2\n"
    matrix = matrix_with(tmp_path, block)
    qwen = matrix.models["qwen3-vl-30b"]
    # 2 slots x 64 x 2 bytes x 48 layers = 12,288 x 838,784 = 10,306,977,792 bytes. The old
    # sum (q, k, v, o, gate, up, down of one 98,304-wide MLP) gave 12,288 x 318,464 = 3.9e9.
    assert qwen.lora_bytes(1) == 12_288 * 838_784 == 10_306_977_792
    # One H100 would need 62.14e9 + 10,306,977,792 + 3 GiB + 1,572,864 x 2049 (KV and the
    # null block) = 78,891,001,600 bytes = 73.47 GiB, over 80e9 x 0.92 = 73.6e9 (68.5 GiB).
    one = 62_140_000_000 + 10_306_977_792 + 3 * 2**30 + 1_572_864 * 2049
    assert one == 78_891_001_600 and one > 73_600_000_000
    # Two: (62.14e9 + 12,288 x 1,373,440) / 2 + 3 GiB + 786,432 x 2049 = 44.34e9 per GPU.
    per_gpu = (62_140_000_000 + 12_288 * 1_373_440) / 2 + 3 * 2**30 + 786_432 * 2049
    assert per_gpu == 44_341_040_000
    for gpu in ("a100", "h100"):
        fit = matrix.fit(qwen, matrix.gpu(gpu))
        assert (fit.count, fit.need_gib * 2**30) == (2, pytest.approx(2 * per_gpu))
    # 44.34e9 is over an L40S's 44.16e9: 4 of them (1 kv head each; per GPU attention
    # 8192 + 2048 + 256, experts 128 x (4096 + 576), gate 2176: 610,688).
    l40s = matrix.fit(qwen, matrix.gpu("l40s"))
    assert l40s.gpu_string == "L40S:4"
    assert qwen.lora_bytes(4) == 12_288 * 4 * 610_688
    assert matrix.fit(qwen, matrix.gpu("h200")).count == 1  # 78.89e9 <= 129.72e9


def test_experts_not_fused_on_disk_take_a_third_h(tmp_path):
    # Another MoE architecture (no is_3d_moe_weight): FusedMoEWithLoRA keeps w1 and w3 A
    # apart: E x (3h + 3I) = 128 x (6144 + 2304) = 1,081,344 per layer on one GPU.
    matrix = matrix_with(tmp_path, edit=lambda t: t.replace(
        "architecture: Qwen3VLMoeForConditionalGeneration", "architecture: Qwen3MoeForCausalLM"))
    assert matrix.models["qwen3-vl-30b"].lora_bytes(1) == 6144 * (17_408 + 1_081_344 + 2_176)


def test_a_dense_models_lora_buffers(tmp_path):
    # gemma-3-12b: h 3840, q 16 x 256 = 4096, kv 8 x 256 = 2048, I 15360. Per layer on one
    # GPU: attention 4h + 2q + 2kv = 15,360 + 8,192 + 4,096; MLP gate+up A 2h, B 2I, down
    # A I, B h: 3h + 3I = 11,520 + 46,080. 85,248 in all; 1 slot x rank 16 x 2 x 48 layers.
    block = "    vision: {images: 4, videos: 0}\n    adapters:\n" \
            "      - {name: g12-chat, rank: 16, path: gemma-3-12b/chat}\n\n  gemma-3-27b:"
    matrix = matrix_with(tmp_path, edit=lambda t: t.replace(
        "    vision: {images: 4, videos: 0}\n\n  gemma-3-27b:", block, 1))
    gemma = matrix.models["gemma-3-12b"]
    assert 15_360 + 8_192 + 4_096 + 11_520 + 46_080 == 85_248
    assert gemma.lora_bytes(1) == 1 * 16 * 2 * 48 * 85_248 == 130_940_928
    plain = config.load()
    before = plain.fit(plain.models["gemma-3-12b"], plain.gpu("h100"))
    after = matrix.fit(gemma, matrix.gpu("h100"))
    assert after.need_gib == pytest.approx(before.need_gib + 130_940_928 / 2**30)
    # (73.6e9 - 24.38e9 - 130,940,928 - 3 GiB) // 1 MiB blocks, 7493 blocks per request.
    blocks = (73_600_000_000 - 24_380_000_000 - 130_940_928 - 3 * 2**30) // 2**20
    assert after.kv_tokens == int(blocks / 7493 * 32768) < before.kv_tokens


def test_lora_memory_enters_the_fit(tmp_path):
    plain = config.load()
    with_lora = matrix_with(tmp_path)
    qwen, before_qwen = with_lora.models["qwen3-vl-30b"], plain.models["qwen3-vl-30b"]
    before = plain.fit(before_qwen, plain.gpu("l40s"))
    after = with_lora.fit(qwen, with_lora.gpu("l40s"))
    assert after.count == before.count == 2
    assert after.need_gib == pytest.approx(before.need_gib + 6144 * QWEN_PER_LAYER_TP2 / 2**30)
    assert after.kv_tokens < before.kv_tokens
    # Even rank 32 pushes it off one H100: 62.14e9 + 5,153,488,896 + 3 GiB + 1,572,864 x 2049
    # = 73,737,512,704 > 73.6e9.
    assert 62_140_000_000 + 6144 * QWEN_PER_LAYER + 3 * 2**30 + 1_572_864 * 2049 == \
        73_737_512_704
    assert plain.fit(before_qwen, plain.gpu("h100")).count == 1
    assert with_lora.fit(qwen, with_lora.gpu("h100")).gpu_string == "H100:2"


@pytest.mark.parametrize(("block", "edit", "message"), [
    (QWEN_LORA, lambda t: t.replace("    hidden_size: 2048\n", ""),
     "models.qwen3-vl-30b: hidden_size required with adapters"),
    (QWEN_LORA, lambda t: t.replace(
        "    architecture: Qwen3VLMoeForConditionalGeneration   # vLLM fuses its experts' LoRA "
        "(3-D)\n", ""),
     "models.qwen3-vl-30b: architecture required with adapters"),
    (QWEN_LORA, lambda t: t.replace(
        "    moe: {experts: 128, expert_intermediate_size: 768}   # every layer's MLP "
        "(text_config)\n", ""),
     "models.qwen3-vl-30b: intermediate_size (or moe) required with adapters"),
    (QWEN_LORA.replace("name: python", "name: 'py:thon'"), None,
     "models.qwen3-vl-30b.adapters.0.name: 'py:thon' must be letters, digits"),
    (QWEN_LORA.replace("rank: 32", "rank: 1024"), None,
     "models.qwen3-vl-30b.adapters.0.rank: 1024 is above vLLM's largest LoRA rank (512)"),
    (QWEN_LORA.replace("path: qwen3-vl-30b/python", "path: ../etc"), None,
     "models.qwen3-vl-30b.adapters.0.path: '../etc' must be a relative path"),
    (QWEN_LORA.replace("name: math", "name: Gemma-3-12B"), None,
     "models.qwen3-vl-30b.adapters.1.name: 'Gemma-3-12B' collides with 'gemma-3-12b'"),
    (QWEN_LORA.replace("name: math", "name: PYTHON"), None,
     "models.qwen3-vl-30b.adapters.1.name: 'PYTHON' collides with 'qwen3-vl-30b:python'"),
    (QWEN_LORA + "    max_loras: 3\n", None,
     "models.qwen3-vl-30b.max_loras: 3 is more than its 2"),
    (QWEN_LORA.replace("rank: 32, ", ""), None, "models.qwen3-vl-30b.adapters.0.rank: required"),
])
def test_adapter_mistakes_are_one_line_each(tmp_path, block, edit, message):
    with pytest.raises(config.ConfigError) as err:
        matrix_with(tmp_path, block, edit=edit or (lambda t: t))
    assert message in str(err.value), str(err.value)
    assert len(str(err.value).splitlines()) == 1 and err.value.exit_code == 3


# entrypoints/common/cli_args.py LoRAParserAction: `"=" in item and "," not in item` is the
# name=path form; anything else goes to json.loads, and a parse error is parser.error (exit).
@pytest.mark.parametrize(("replace", "field", "value"), [
    (("name: python", "name: 'py,thon'"), "name", "py,thon"),
    (("path: qwen3-vl-30b/python", "path: 'qwen3-vl-30b/py,thon'"), "path",
     "qwen3-vl-30b/py,thon"),
])
def test_a_comma_in_an_adapter_name_or_path_is_refused(tmp_path, replace, field, value):
    with pytest.raises(config.ConfigError) as err:
        matrix_with(tmp_path, QWEN_LORA.replace(*replace))
    path = tmp_path / "models.yaml"
    assert str(err.value) == (
        f"{path}: models.qwen3-vl-30b.adapters.0.{field}: '{value}' contains ',', which makes "
        "vLLM's --lora-modules read it as JSON and exit")
    assert err.value.exit_code == 3


def test_a_comma_is_refused_by_the_cli_in_one_line_with_exit_3(tmp_path):
    matrix_path = tmp_path / "models.yaml"
    with pytest.raises(config.ConfigError):
        matrix_with(tmp_path, QWEN_LORA.replace("name: math", "name: 'ma,th'"))
    result = CliRunner().invoke(deploy.cli, ["--list", "--config", str(matrix_path)])
    assert result.exit_code == 3
    assert result.stderr.strip() == (
        f"Error: {matrix_path}: models.qwen3-vl-30b.adapters.1.name: 'ma,th' contains ',', "
        "which makes vLLM's --lora-modules read it as JSON and exit")


def test_engine_serves_the_adapters_from_the_volume(tmp_path):
    matrix = matrix_with(tmp_path)
    fit = matrix.fit(matrix.models["qwen3-vl-30b"], matrix.gpu("h100"))
    argv = engine.engine_argv(fit, matrix.defaults)
    i = argv.index("--enable-lora")
    assert argv[i:i + 8] == ["--enable-lora", "--max-lora-rank", "32", "--max-loras", "2",
                             "--lora-modules", "python=/adapters/qwen3-vl-30b/python",
                             "math=/adapters/qwen3-vl-30b/math"]
    gemma = matrix.fit(matrix.models["gemma-3-12b"], matrix.gpu("h100"))
    assert "--enable-lora" not in engine.engine_argv(gemma, matrix.defaults)


def test_only_pools_with_adapters_mount_the_adapters_volume(tmp_path):
    matrix = matrix_with(tmp_path)
    built = vllm_gpu_server.build(matrix, "h100")
    for model, cls in built.pools.items():
        mounts = {at: v.name for at, v in cls._get_class_service_function().info().volumes.items()}
        if model == "qwen3-vl-30b":
            assert mounts["/adapters"] == "vllm-lora-adapters"
        else:
            assert "/adapters" not in mounts


@pytest.mark.parametrize(("name", "found"), [
    ("python", ("qwen3-vl-30b", "python")),
    ("PYTHON", ("qwen3-vl-30b", "python")),
    ("qwen3-vl-30b:math", ("qwen3-vl-30b", "math")),
    ("Qwen/Qwen3-VL-30B-A3B-Instruct:math", ("qwen3-vl-30b", "math")),
    ("gemma-3-12b:python", None),  # an adapter only exists on its own base model
    ("qwen3-vl-30b:rust", None),
    ("rust", None),
])
def test_find_adapter(tmp_path, name, found):
    matrix = matrix_with(tmp_path)
    hit = config.find_adapter(matrix.models.values(), name)
    assert (None if hit is None else (hit[0].key, hit[1].name)) == found


# ## Checking an adapter directory before it is uploaded


def adapter_dir(tmp_path: Path, **peft) -> Path:
    folder = tmp_path / "python-lora"
    folder.mkdir(exist_ok=True)
    settings = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "bias": "none",
                "target_modules": ["q_proj", "v_proj"], "init_lora_weights": True,
                "base_model_name_or_path": "Qwen/Qwen3-VL-30B-A3B-Instruct", **peft}
    settings = {k: v for k, v in settings.items() if v is not MISSING}
    (folder / "adapter_config.json").write_text(json.dumps(settings))
    (folder / "adapter_model.safetensors").write_bytes(b"\0" * 1000)
    return folder


def test_a_good_adapter_directory_passes(tmp_path):
    folder = adapter_dir(tmp_path, base_model_name_or_path="/models/Qwen/Qwen3-VL-30B-A3B-Instruct")
    (folder / "README.md").write_text("notes")
    checked = adapters.check_adapter_dir(matrix_with(tmp_path), "QWEN3-VL-30B", "python", folder)
    assert (checked.model.key, checked.adapter.name) == ("qwen3-vl-30b", "python")
    assert [str(f) for f in checked.files] == ["README.md", "adapter_config.json",
                                              "adapter_model.safetensors"]
    assert checked.size_bytes == 1000 + 5 + (folder / "adapter_config.json").stat().st_size


MISSING = object()  # a field left out of adapter_config.json


def broken(tmp_path: Path, case: str) -> Path:
    folder = adapter_dir(tmp_path)
    if case == "no config":
        (folder / "adapter_config.json").unlink()
    elif case == "bad json":
        (folder / "adapter_config.json").write_text("{r: 16")
    elif case == "not lora":
        adapter_dir(tmp_path, peft_type="PROMPT_TUNING")
    elif case == "other base":
        adapter_dir(tmp_path, base_model_name_or_path="google/gemma-3-12b-it")
    elif case == "no rank":
        adapter_dir(tmp_path, r=None)
    elif case == "rank too high":
        adapter_dir(tmp_path, r=64)
    elif case == "no weights":
        (folder / "adapter_model.safetensors").unlink()
    return folder


@pytest.mark.parametrize(("case", "message"), [
    ("no config", "python-lora: no adapter_config.json (is this a PEFT LoRA adapter?)"),
    ("bad json", "adapter_config.json: not valid JSON"),
    ("not lora", "adapter_config.json: peft_type is PROMPT_TUNING, vLLM serves LORA"),
    ("other base", ("adapter_config.json: base_model_name_or_path is 'google/gemma-3-12b-it', "
                    "but qwen3-vl-30b serves Qwen/Qwen3-VL-30B-A3B-Instruct")),
    ("no rank", "adapter_config.json: 'r' (the LoRA rank) must be a positive integer"),
    ("rank too high", "adapter_config.json: rank 64 is above the 32 declared for python"),
    ("no weights", "python-lora: no weights (adapter_model.safetensors or adapter_model.bin)"),
])
def test_every_directory_problem_is_named(tmp_path, case, message):
    folder = broken(tmp_path, case)
    with pytest.raises(adapters.AdapterError) as err:
        adapters.check_adapter_dir(matrix_with(tmp_path), "qwen3-vl-30b", "python", folder)
    assert message in str(err.value)
    assert err.value.exit_code == 2


# What vLLM 0.33 refuses when it loads an adapter (lora/peft_helper.py PEFTHelper), each one
# line, exit 2, before anything is uploaded: a static adapter that fails these aborts start-up.
PEFT_REFUSALS = [
    ({"use_dora": True}, "use_dora: vLLM does not serve DoRA (use_dora)"),
    ({"lora_bias": True}, "lora_bias: vLLM does not serve LoRA bias (lora_bias)"),
    ({"bias": "all"}, "bias is 'all': vLLM serves only adapters with bias 'none'"),
    ({"bias": "lora_only"}, "bias is 'lora_only': vLLM serves only adapters with bias 'none'"),
    ({"modules_to_save": ["lm_head"]},
     ("modules_to_save ['lm_head']: vLLM serves no fully trained modules beside the LoRA "
      "weights on a generative model")),
    ({"modules_to_save": ["score"]},  # peft_helper takes it; only a classifier model loads it
     "modules_to_save ['score']: vLLM serves no fully trained modules"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights 'pissa': vLLM refuses it"),
    ({"init_lora_weights": "olora"}, "init_lora_weights 'olora': vLLM refuses it"),
    ({"init_lora_weights": "loftq"}, "init_lora_weights 'loftq': vLLM refuses it"),
    ({"init_lora_weights": "corda"}, "init_lora_weights 'corda': vLLM refuses it"),
    ({"alora_invocation_tokens": [1, 2]},
     "alora_invocation_tokens: vLLM does not serve Activated LoRA"),
    ({"layer_replication": [[0, 4]]}, "layer_replication: vLLM does not serve layer_replication"),
    ({"use_qalora": True}, "use_qalora: vLLM does not serve QALoRA (use_qalora)"),
    ({"lora_alpha": MISSING, "target_modules": MISSING},
     "lacks lora_alpha, target_modules, which vLLM requires"),
    ({"rank_pattern": {"q_proj": 0}}, "rank_pattern: every rank must be a positive integer"),
    # the rank vLLM checks is the largest of r and rank_pattern (PEFTHelper.validate_legal)
    ({"r": 16, "rank_pattern": {"down_proj": 64}},
     "rank 64 (from rank_pattern) is above the 32 declared for python"),
]


@pytest.mark.parametrize(("peft", "message"), PEFT_REFUSALS,
                         ids=[m.split(":")[0][:30] for _, m in PEFT_REFUSALS])
def test_every_refusal_of_vllms_peft_checks_is_one_line(tmp_path, peft, message):
    folder = adapter_dir(tmp_path, **peft)
    matrix = matrix_with(tmp_path)
    with pytest.raises(adapters.AdapterError) as err:
        adapters.check_adapter_dir(matrix, "qwen3-vl-30b", "python", folder)
    (line,) = str(err.value).splitlines()
    assert line.startswith(f"{folder / 'adapter_config.json'}: ") and message in line, line
    assert err.value.exit_code == 2
    result = CliRunner().invoke(deploy.cli, ["--config", str(matrix.path), "--upload-adapter",
                                             "qwen3-vl-30b", "python", str(folder)])
    assert result.exit_code == 2 and result.stderr.strip() == f"Error: {line}", result.output


@pytest.mark.parametrize("init", [True, False, "gaussian", "Gaussian", "eva", "orthogonal",
                                  "mica", "lora_ga"])
def test_inits_that_leave_a_plain_lora_are_served(tmp_path, init):
    folder = adapter_dir(tmp_path, init_lora_weights=init, rank_pattern={"q_proj": 32})
    checked = adapters.check_adapter_dir(matrix_with(tmp_path), "qwen3-vl-30b", "python", folder)
    assert checked.adapter.name == "python"


def test_several_refusals_give_several_lines(tmp_path):
    folder = adapter_dir(tmp_path, use_dora=True, bias="all")
    with pytest.raises(adapters.AdapterError) as err:
        adapters.check_adapter_dir(matrix_with(tmp_path), "qwen3-vl-30b", "python", folder)
    assert [line.split(": ", 1)[1] for line in str(err.value).splitlines()] == [
        "use_dora: vLLM does not serve DoRA (use_dora)",
        "bias is 'all': vLLM serves only adapters with bias 'none'"]


def test_undeclared_adapter_and_missing_directory(tmp_path):
    matrix = matrix_with(tmp_path)
    with pytest.raises(adapters.AdapterError, match="adapter 'rust' is not declared for "
                       "qwen3-vl-30b in models.yaml \\(declared: python, math\\)"):
        adapters.check_adapter_dir(matrix, "qwen3-vl-30b", "rust", tmp_path)
    with pytest.raises(adapters.AdapterError, match="nowhere: not a directory"):
        adapters.check_adapter_dir(matrix, "qwen3-vl-30b", "python", tmp_path / "nowhere")
    with pytest.raises(config.UsageError, match="unknown model 'llama'"):
        adapters.check_adapter_dir(matrix, "llama", "python", tmp_path)


# ## Uploading, with the Modal SDK patched at its boundary


class FakeVolume:
    def __init__(self):
        self.commits = []

    def batch_upload(self, force=False):
        volume = self

        class Batch:
            def __enter__(self):
                self.files = []
                return self

            def put_file(self, local, remote):
                self.files.append((Path(local).name, remote))

            def __exit__(self, *exc):
                volume.commits.append((force, self.files))

        return Batch()


def test_upload_puts_every_file_under_the_declared_path(tmp_path):
    checked = adapters.check_adapter_dir(matrix_with(tmp_path), "qwen3-vl-30b", "python",
                                         adapter_dir(tmp_path))
    volume, seen = FakeVolume(), []
    with mock.patch("modal.Volume.from_name", return_value=volume) as from_name:
        adapters.upload(checked, environment="dev", progress=seen.append)
    from_name.assert_called_once_with("vllm-lora-adapters", create_if_missing=True,
                                      environment_name="dev")
    assert volume.commits == [
        (True, [("adapter_config.json", "/qwen3-vl-30b/python/adapter_config.json")]),
        (True, [("adapter_model.safetensors",
                 "/qwen3-vl-30b/python/adapter_model.safetensors")]),
    ]
    assert seen[-1] == checked.size_bytes and seen == sorted(seen)


@pytest.fixture
def credentials(monkeypatch):
    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-test")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-test")
    import modal

    monkeypatch.setattr(modal.Client, "from_env", lambda: None)  # cloud.connect: it opens


def run(*args: str):
    result = CliRunner().invoke(deploy.cli, list(args))
    return result, result.output + (result.stderr if result.stderr_bytes else "")


@pytest.mark.parametrize("redeploy", [False, True])
def test_cli_uploads_then_redeploys_the_deployed_apps(tmp_path, credentials, redeploy):
    matrix = matrix_with(tmp_path)
    folder = adapter_dir(tmp_path)
    deployed = {"vllm-h100": object(), "vllm-qwen3-vl-30b-l40s": object(), "other": object()}
    with mock.patch("modal.Volume.from_name", return_value=FakeVolume()), \
         mock.patch("cloud.deployed_apps", return_value=deployed), \
         mock.patch("cloud.deploy_command") as deploy_command:
        result, output = run("--config", str(matrix.path), "--upload-adapter", "qwen3-vl-30b",
                             "python", str(folder), *(["--redeploy"] if redeploy else []))
    assert result.exit_code == 0, output
    assert "Uploaded 2 file(s) of python to vllm-lora-adapters:/qwen3-vl-30b/python" in output
    if redeploy:
        apps = deploy_command.call_args.args[1]
        assert [a.name for a in apps] == ["vllm-h100", "vllm-qwen3-vl-30b-l40s"]
    else:
        deploy_command.assert_not_called()
        assert "uv run deploy.py --gpu h100; uv run deploy.py --model qwen3-vl-30b-l40s" in output


def test_cli_checks_before_it_needs_credentials(tmp_path):
    matrix = matrix_with(tmp_path)
    result, output = run("--config", str(matrix.path), "--upload-adapter", "qwen3-vl-30b",
                         "python", str(broken(tmp_path, "no weights")))
    assert result.exit_code == 2, output
    assert "no weights" in output and "Traceback" not in output
    result, output = run("--list", "--redeploy")
    assert result.exit_code == 2
    assert "Error: --redeploy goes with --upload-adapter, not --list" in output


def test_the_default_matrix_declares_no_adapters():
    """vLLM refuses to start when a --lora-modules path is missing: none ship by default."""
    assert all(not m.adapters for m in config.load().models.values())
    assert all(plan.ADAPTERS_VOLUME not in p.volumes.values()
               for app in plan.all_gpu_apps(config.load()) for p in app.pools)


# ## Deploy preflight: a declared adapter must be on the Volume before vLLM starts


REAL_VOLUME_FROM_NAME = __import__("modal").Volume.from_name


@pytest.mark.parametrize("uploaded", [{"python", "math"}, {"python"}, set()])
def test_deploy_refuses_when_a_declared_adapter_is_not_uploaded(
        tmp_path, token, sdk, uploaded):  # noqa: F811 - pytest fixtures from test_cloud
    import modal
    from test_cloud import run as cloud_run

    files = {f"qwen3-vl-30b/{n}": ["adapter_config.json", "adapter_model.safetensors"]
             for n in uploaded}

    def volume_from_name(name, *, environment_name=None, create_if_missing=False):
        if create_if_missing:  # building an app: the real lazy reference, no RPC
            return REAL_VOLUME_FROM_NAME(name, create_if_missing=True)
        volume = mock.MagicMock(name=f"Volume {name}")

        def listdir(path):
            if path not in files:
                raise modal.exception.NotFoundError(f"No such file or directory: {path}")
            return [mock.Mock(path=f"{path}/{f}") for f in files[path]]

        volume.listdir.side_effect = listdir
        return volume

    matrix = matrix_with(tmp_path)
    with mock.patch.object(modal.Volume, "from_name", side_effect=volume_from_name):
        result = cloud_run("--config", str(matrix.path), "--gpu", "h100")
    deploy_app = sdk.mocks.deploy_app
    missing = sorted({"python", "math"} - uploaded)
    if not missing:
        assert result.exit_code == 0, result.output
        assert deploy_app.call_count == 1
        return
    assert result.exit_code == 6, result.output
    deploy_app.assert_not_called()
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [
        f"Error: LoRA adapter '{n}' of qwen3-vl-30b is not uploaded (vllm-lora-adapters:"
        f"/qwen3-vl-30b/{n}); upload it: uv run deploy.py --upload-adapter qwen3-vl-30b {n} DIR"
        for n in missing]
