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
    hidden_size: 2048
    intermediate_size: 98304
    adapters:
      - {name: python, rank: 32, path: qwen3-vl-30b/python}
      - {name: math, rank: 20, path: qwen3-vl-30b/math}
"""


def matrix_with(tmp_path: Path, block: str = QWEN_LORA) -> config.Matrix:
    text = config.DEFAULT_PATH.read_text().replace("    tool_parser: hermes\n", block)
    path = tmp_path / "models.yaml"
    path.write_text(text)
    return config.load(path)


def test_adapters_are_read_and_sized(tmp_path):
    qwen = matrix_with(tmp_path).models["qwen3-vl-30b"]
    assert [(a.name, a.rank, a.path) for a in qwen.adapters] == [
        ("python", 32, "qwen3-vl-30b/python"), ("math", 20, "qwen3-vl-30b/math")]
    assert qwen.lora_rank == 32  # vLLM takes 1, 8, 16, 32, ...: 32 holds both
    assert qwen.loras_on_gpu == 2
    # Per layer, (in + out) of each projection: q 2048+32*128, k and v 2048+4*128,
    # o 32*128+2048, gate and up 2048+98304, down 98304+2048.
    per_layer = (2048 + 4096) * 2 + (2048 + 512) * 2 + (2048 + 98304) * 3
    assert per_layer == 318_464
    assert qwen.lora_bytes == 2 * 32 * 2 * 48 * per_layer  # slots x rank x bf16 x layers


def test_lora_memory_enters_the_fit(tmp_path):
    plain = config.load()
    with_lora = matrix_with(tmp_path)
    for gpu in ("l40s", "h100"):
        before = plain.fit(plain.models["qwen3-vl-30b"], plain.gpu(gpu))
        after = with_lora.fit(with_lora.models["qwen3-vl-30b"], with_lora.gpu(gpu))
        lora_gib = 2 * 32 * 2 * 48 * 318_464 / 2**30
        assert after.need_gib == pytest.approx(before.need_gib + lora_gib)
        assert after.count == before.count
        assert after.kv_tokens < before.kv_tokens


@pytest.mark.parametrize(("block", "message"), [
    ("    adapters:\n      - {name: py, rank: 8, path: q/py}\n",
     "models.qwen3-vl-30b: hidden_size and intermediate_size are required with adapters"),
    (QWEN_LORA.replace("name: python", "name: 'py:thon'"),
     "models.qwen3-vl-30b.adapters.0.name: 'py:thon' must be letters, digits"),
    (QWEN_LORA.replace("rank: 32", "rank: 1024"),
     "models.qwen3-vl-30b.adapters.0.rank: 1024 is above vLLM's largest LoRA rank (512)"),
    (QWEN_LORA.replace("path: qwen3-vl-30b/python", "path: ../etc"),
     "models.qwen3-vl-30b.adapters.0.path: '../etc' must be a relative path"),
    (QWEN_LORA.replace("name: math", "name: Gemma-3-12B"),
     "models.qwen3-vl-30b.adapters.1.name: 'Gemma-3-12B' collides with 'gemma-3-12b'"),
    (QWEN_LORA.replace("name: math", "name: PYTHON"),
     "models.qwen3-vl-30b.adapters.1.name: 'PYTHON' collides with 'qwen3-vl-30b:python'"),
    (QWEN_LORA + "    max_loras: 3\n", "models.qwen3-vl-30b.max_loras: 3 is more than its 2"),
    (QWEN_LORA.replace("rank: 32, ", ""), "models.qwen3-vl-30b.adapters.0.rank: required"),
])
def test_adapter_mistakes_are_one_line_each(tmp_path, block, message):
    with pytest.raises(config.ConfigError) as err:
        matrix_with(tmp_path, block)
    assert message in str(err.value), str(err.value)


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
    settings = {"peft_type": "LORA", "r": 16,
                "base_model_name_or_path": "Qwen/Qwen3-VL-30B-A3B-Instruct", **peft}
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
