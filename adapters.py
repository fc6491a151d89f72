"""LoRA adapters: check a local adapter directory, then upload it to the adapters Volume.

vLLM loads the adapters listed in models.yaml when a model's pool starts
(`--lora-modules name=/adapters/<path>`), so an adapter is first declared
there, then uploaded here, then served after a redeploy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import config
import plan

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


class AdapterError(config.UsageError):
    """The adapter directory or its declaration does not match what will be served."""


@dataclass(frozen=True)
class CheckedAdapter:
    model: config.Model
    adapter: config.Adapter
    directory: Path
    files: list[Path]  # every file to upload, relative to `directory`

    @property
    def remote_path(self) -> str:
        return self.adapter.path

    @property
    def size_bytes(self) -> int:
        return sum((self.directory / f).stat().st_size for f in self.files)


def check_adapter_dir(matrix: config.Matrix, model_name: str, adapter_name: str,
                      directory: str | Path) -> CheckedAdapter:
    """Every reason vLLM would refuse this adapter at start-up, found before uploading it."""
    model = matrix.resolve_model(model_name)
    adapter = next((a for a in model.adapters if a.name.lower() == adapter_name.lower()), None)
    if adapter is None:
        declared = ", ".join(a.name for a in model.adapters) or "none"
        raise AdapterError(
            f"adapter '{adapter_name}' is not declared for {model.key} in {matrix.path.name} "
            f"(declared: {declared}); add it under models.{model.key}.adapters first, e.g. "
            f"- {{name: {adapter_name}, rank: 16, path: {model.key}/{adapter_name}}}"
        )
    folder = Path(directory)
    if not folder.is_dir():
        raise AdapterError(f"{folder}: not a directory")
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise AdapterError(f"{folder}: no adapter_config.json (is this a PEFT LoRA adapter?)")
    try:
        peft = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{config_file}: not valid JSON ({exc})") from None
    if not isinstance(peft, dict):
        raise AdapterError(f"{config_file}: expected a JSON object")
    if str(peft.get("peft_type", "LORA")).upper() != "LORA":
        raise AdapterError(f"{config_file}: peft_type is {peft['peft_type']}, vLLM serves LORA")
    base = str(peft.get("base_model_name_or_path") or "")
    if not _same_model(base, model):
        raise AdapterError(
            f"{config_file}: base_model_name_or_path is '{base}', but {model.key} serves "
            f"{model.huggingface_id}; an adapter only works on the model it was trained on"
        )
    problems = [f"{config_file}: {problem}" for problem in peft_problems(peft)]
    if problems:
        raise AdapterError("\n".join(problems))
    rank, where = effective_rank(peft)
    if rank > adapter.rank:
        raise AdapterError(
            f"{config_file}: rank {rank}{where} is above the {adapter.rank} declared for "
            f"{adapter.name} in {matrix.path.name}; vLLM would refuse it at start-up"
        )
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise AdapterError(f"{folder}: no weights ({' or '.join(WEIGHT_FILES)})")
    files = sorted(p.relative_to(folder) for p in folder.rglob("*")
                   if p.is_file() and not p.name.startswith("."))
    return CheckedAdapter(model, adapter, folder, files)


# ## What vLLM 0.33 refuses when it loads an adapter (lora/peft_helper.py PEFTHelper)
#
# A static adapter (--lora-modules) that fails these checks aborts vLLM's start-up, so
# a deploy would crash-loop; each is refused here, before the upload, as one line.

# PEFTHelper._init_is_supported: these inits only set the first weights (the saved
# adapter is a plain LoRA); others (PiSSA, OLoRA, CorDA, LoftQ, ...) change the base model.
INIT_LORA_WEIGHTS_SERVED = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
# PEFTHelper's fields without a default: from_dict refuses a config that lacks one.
REQUIRED_FIELDS = ("r", "lora_alpha", "target_modules")
# PEFTHelper._validate_features: PEFT features vLLM does not implement.
UNSERVED_FEATURES = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "LoRA bias (lora_bias)",
    "alora_invocation_tokens": "Activated LoRA (alora_invocation_tokens)",
    "layer_replication": "layer_replication",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "use_qalora": "QALoRA (use_qalora)",
}


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def peft_problems(peft: dict) -> list[str]:
    """Every reason vLLM 0.33 would refuse this adapter_config.json, one line each."""
    problems = []
    missing = [name for name in REQUIRED_FIELDS if name not in peft]
    if missing:
        problems.append(f"lacks {', '.join(missing)}, which vLLM requires")
    if "r" in peft and not _positive_int(peft["r"]):
        problems.append("'r' (the LoRA rank) must be a positive integer")
    pattern = peft.get("rank_pattern") or {}
    if not isinstance(pattern, dict) or not all(_positive_int(v) for v in pattern.values()):
        problems.append("rank_pattern: every rank must be a positive integer")
    for field, feature in UNSERVED_FEATURES.items():
        if peft.get(field):
            problems.append(f"{field}: vLLM does not serve {feature}")
    bias = peft.get("bias", "none")
    if bias != "none":
        problems.append(f"bias is {bias!r}: vLLM serves only adapters with bias 'none'")
    if peft.get("modules_to_save"):
        # peft_helper.py takes only classifier or score, and lora/model_manager.py loads
        # those only into a classification model's head; the models served here generate.
        problems.append(f"modules_to_save {peft['modules_to_save']!r}: vLLM serves no fully "
                        "trained modules beside the LoRA weights on a generative model")
    init = peft.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in INIT_LORA_WEIGHTS_SERVED:
        problems.append(f"init_lora_weights {init!r}: vLLM refuses it (the init changes the "
                        "base model's weights; convert the adapter to a plain LoRA with PEFT)")
    return problems


def effective_rank(peft: dict) -> tuple[int, str]:
    """The rank vLLM checks against --max-lora-rank: the largest of r and rank_pattern's
    values (PEFTHelper.validate_legal), and where it comes from."""
    pattern = [v for v in (peft.get("rank_pattern") or {}).values()]
    rank = max([peft["r"], *pattern])
    return rank, (" (from rank_pattern)" if rank > peft["r"] else "")


def _same_model(base: str, model: config.Model) -> bool:
    """Hugging Face id, served name, or a local path ending in the Hugging Face id."""
    wanted = base.strip().rstrip("/").lower()
    return any(wanted == alias.lower() or wanted.endswith("/" + model.huggingface_id.lower())
               for alias in model.aliases)


def upload(checked: CheckedAdapter, *, environment: str | None = None, progress=None) -> None:
    """Upload file by file (each a small commit), so `progress(done_bytes)` tells the truth."""
    import modal

    volume = modal.Volume.from_name(plan.ADAPTERS_VOLUME, create_if_missing=True,
                                    environment_name=environment)
    done = 0
    for relative in checked.files:
        with volume.batch_upload(force=True) as batch:  # replaces an earlier upload
            batch.put_file(checked.directory / relative, f"/{checked.remote_path}/{relative}")
        done += (checked.directory / relative).stat().st_size
        if progress:
            progress(done)


def apps_serving(matrix: config.Matrix, model: config.Model) -> list[plan.App]:
    """Every app of the matrix (GPU-based and legacy) with a pool for this model."""
    apps = plan.all_gpu_apps(matrix) + plan.all_legacy_apps(matrix)
    return [a for a in apps if any(p.model.key == model.key for p in a.pools)]


def upload_command(matrix: config.Matrix, model_name: str, adapter_name: str, directory: Path,
                   *, redeploy: bool, environment: str | None, verbose: bool) -> None:
    """`deploy.py --upload-adapter MODEL NAME DIR [--redeploy]`."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    import cloud

    checked = check_adapter_dir(matrix, model_name, adapter_name, directory)  # offline first
    cloud.require_credentials()
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  console=console, transient=True) as bars:
        task = bars.add_task(f"uploading {checked.adapter.name}", total=checked.size_bytes)
        try:
            upload(checked, environment=environment,
                   progress=lambda done: bars.update(task, completed=done))
        except Exception as exc:  # every Modal failure becomes one line
            raise cloud.translate(exc, f"uploading to Volume '{plan.ADAPTERS_VOLUME}'") from exc
    console.print(f"Uploaded {len(checked.files)} file(s) of {checked.adapter.name} to "
                  f"{plan.ADAPTERS_VOLUME}:/{checked.remote_path}")
    serving = apps_serving(matrix, checked.model)
    deployed = set(cloud.deployed_apps(environment))
    live = [a for a in serving if a.name in deployed]
    if not redeploy:
        how = "; ".join(cloud.deploy_flag(a) for a in live) or "uv run deploy.py --gpu KEY"
        console.print(f"vLLM loads adapters when a replica starts: redeploy ({how}), "
                      "or upload again with --redeploy.")
        return
    if not live:
        console.print(f"No deployed app serves {checked.model.key}; nothing to redeploy.")
        return
    cloud.deploy_command(matrix, live, environment=environment, ignore_endpoint_limit=True,
                         verbose=verbose)
