"""The deployment matrix: load and validate models.yaml, resolve names, check fits.

One entry point, `load(path)`, returns a validated `Matrix` or raises
`ConfigError` whose lines each name the file, the field path and the problem.
Everything else here is pure arithmetic and naming over that `Matrix`; this
module imports no other project module, so every other one may import it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

DEFAULT_PATH = Path(__file__).with_name("models.yaml")
GIB = 1024**3
TENSOR_PARALLEL_SIZES = (1, 2, 4, 8)
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM's --max-lora-rank accepts
BYTES_PER_PARAM = {"bfloat16": 2, "float16": 2, "fp8": 1}
STARTER_PLAN_ENDPOINT_LIMIT = 8  # web endpoints a Modal Starter workspace may deploy


# ## Errors: one type, shown as one line by the CLI


class UserError(Exception):
    """A problem the user can fix; the CLI prints it as one line and exits with `exit_code`."""

    exit_code = 1


class UsageError(UserError):
    """Flags or names that do not make sense (same exit code as a CLI usage error)."""

    exit_code = 2


class ConfigError(UserError):
    """models.yaml is malformed or inconsistent."""

    exit_code = 3


# ## Schema (unknown keys are errors: a typo must not pass silently)
#
# Plain frozen dataclasses that pydantic validates: the --list path can then
# load a cached, already-validated matrix without importing pydantic (~170 ms).
# The constrained types below are named in (string) annotations and built only
# when a file is validated: annotated_types pulls in typing_extensions (~30 ms).


def _constrained_types() -> dict[str, object]:
    from annotated_types import Ge, Gt, Le

    return {
        "Positive": Annotated[float, Gt(0)],
        "PositiveInt": Annotated[int, Gt(0)],
        "Count": Annotated[int, Ge(0)],
        "NonNegative": Annotated[float, Ge(0)],
        "Fraction": Annotated[float, Gt(0), Le(1)],
        "ScaledownWindow": Annotated[int, Ge(2), Le(3600)],  # what Modal accepts, in seconds
        "Timeout": Annotated[int, Gt(0), Le(86400)],  # Modal's functions run 24 hours at most
    }


if TYPE_CHECKING:
    (Positive, PositiveInt, Count, NonNegative, Fraction, ScaledownWindow,
     Timeout) = _constrained_types().values()

_STRICT = {"extra": "forbid"}


@dataclass(frozen=True, kw_only=True)
class Defaults:
    __pydantic_config__ = _STRICT
    vllm_version: str
    gpu_memory_utilization: Fraction = 0.92
    overhead_gib_per_gpu: NonNegative = 3.0
    scaledown_window_seconds: ScaledownWindow = 900
    max_concurrent_inputs: PositiveInt = 32
    max_replicas: PositiveInt = 4
    fast_boot: bool = True
    startup_timeout_seconds: Timeout = 1800
    request_timeout_seconds: Timeout = 3600


@dataclass(frozen=True, kw_only=True)
class GPU:
    __pydantic_config__ = _STRICT
    key: str = ""  # filled from the mapping key
    modal_gpu: str
    vram_gb: Positive
    usd_per_hour: Positive
    max_count: Literal[1, 2, 4, 8] = 8

    def modal_string(self, count: int) -> str:
        return self.modal_gpu if count == 1 else f"{self.modal_gpu}:{count}"


@dataclass(frozen=True, kw_only=True)
class SlidingWindow:
    __pydantic_config__ = _STRICT
    layers: PositiveInt
    window: PositiveInt


@dataclass(frozen=True, kw_only=True)
class Vision:
    __pydantic_config__ = _STRICT
    images: Count = 1
    videos: Count = 0


@dataclass(frozen=True, kw_only=True)
class Adapter:
    """A LoRA adapter served next to its base model, chosen per request by its name."""

    __pydantic_config__ = _STRICT
    name: str
    rank: PositiveInt
    path: str  # inside the adapters Volume, e.g. qwen3-vl-30b/python


@dataclass(frozen=True, kw_only=True)
class Model:
    __pydantic_config__ = _STRICT
    key: str = ""  # filled from the mapping key
    name: str = ""  # defaults to huggingface_id
    huggingface_id: str
    revision: str | None = None
    gated: bool = False
    params_b: Positive
    layers: PositiveInt
    attention_heads: PositiveInt
    kv_heads: PositiveInt
    head_dim: PositiveInt
    sliding_window: SlidingWindow | None = None
    dtype: Literal["bfloat16", "float16"] = "bfloat16"
    quantization: Literal["fp8"] | None = None
    max_model_len: PositiveInt
    tool_parser: str | None = None
    chat_template: str | None = None
    vision: Vision | None = None
    snapshot: bool = False
    gpus: tuple[str, ...] | None = None  # None: every GPU of the matrix
    extra_args: tuple[str, ...] = ()
    adapters: tuple[Adapter, ...] = ()
    max_loras: PositiveInt | None = None  # adapters held on the GPU at once; default: all
    hidden_size: PositiveInt | None = None  # these two size LoRA buffers (needed with adapters)
    intermediate_size: PositiveInt | None = None  # MoE: all experts' MLP width together

    @property
    def lora_rank(self) -> int:
        """vLLM's --max-lora-rank: the smallest rank it accepts that holds every adapter."""
        top = max((a.rank for a in self.adapters), default=0)
        return next((r for r in LORA_RANKS if r >= top), 0) if self.adapters else 0

    @property
    def loras_on_gpu(self) -> int:
        return (self.max_loras or len(self.adapters)) if self.adapters else 0

    @property
    def lora_bytes(self) -> int:
        """GPU memory vLLM reserves for LoRA weights: A (in x r) and B (r x out), bf16,
        for q, k, v, o, gate, up and down in every layer, for each adapter slot."""
        if not self.adapters:
            return 0
        hidden, mlp = self.hidden_size or 0, self.intermediate_size or 0
        q, kv = self.attention_heads * self.head_dim, self.kv_heads * self.head_dim
        in_plus_out = (hidden + q) * 2 + (hidden + kv) * 2 + (hidden + mlp) * 3
        return self.loras_on_gpu * self.lora_rank * 2 * self.layers * in_plus_out

    @property
    def aliases(self) -> list[str]:
        """Every name a client may send for this model (matched without regard to case)."""
        return list(dict.fromkeys([self.name, self.key, self.huggingface_id]))

    @property
    def weight_bytes(self) -> float:
        return self.params_b * 1e9 * BYTES_PER_PARAM[self.quantization or self.dtype]


@dataclass(frozen=True, kw_only=True)
class MatrixFile:
    __pydantic_config__ = _STRICT
    defaults: Defaults
    gpus: dict[str, GPU]
    models: dict[str, Model]


# ## Fit check: weights + KV cache at max_model_len + overhead against VRAM


@dataclass(frozen=True)
class Fit:
    """How one model sits on one GPU type: the smallest tensor-parallel size that works."""

    model: Model
    gpu: GPU
    fits: bool
    count: int  # GPUs per replica (= --tensor-parallel-size); 0 when it does not fit
    need_gib: float  # weights + one max-length sequence's KV cache + overhead, all GPUs
    budget_gib: float  # VRAM x gpu_memory_utilization, all GPUs
    kv_tokens: int  # tokens of KV cache that fit beside the weights (vLLM's "KV cache size")
    reason: str = ""

    @property
    def gpu_string(self) -> str:
        return self.gpu.modal_string(self.count) if self.fits else ""

    @property
    def usd_per_hour(self) -> float:
        """What one running replica of this cell costs per hour."""
        return self.gpu.usd_per_hour * self.count


def kv_bytes_per_token(model: Model) -> int:
    """KV bytes each token costs in full-attention layers (K and V, 2 bytes each in bf16)."""
    full_layers = model.layers - (model.sliding_window.layers if model.sliding_window else 0)
    return 2 * full_layers * model.kv_heads * model.head_dim * 2


def sliding_kv_bytes(model: Model) -> int:
    """KV bytes of the sliding-window layers for one sequence: capped by the window."""
    if not model.sliding_window:
        return 0
    window = min(model.sliding_window.window, model.max_model_len)
    return 2 * model.sliding_window.layers * model.kv_heads * model.head_dim * 2 * window


def fit_on_gpu(model: Model, gpu: GPU, defaults: Defaults) -> Fit:
    """The smallest tensor-parallel size (1, 2, 4, 8) whose GPUs hold the model.

    Per replica of `count` GPUs, with GB = 1e9 bytes:
      budget = vram_gb x 1e9 x gpu_memory_utilization x count
      need   = params_b x 1e9 x bytes per parameter (2 for bf16/fp16, 1 for fp8)
             + sliding-window KV: 2 (K, V) x sliding layers x kv_heads x head_dim x 2 bytes
               x min(window, max_model_len)  (one sequence; those layers keep only the window)
             + overhead_gib_per_gpu x 2**30 x count
             + full-attention KV: 2 x (layers - sliding layers) x kv_heads x head_dim x 2 bytes
               x max_model_len
             + LoRA slots, with adapters (Model.lora_bytes): max_loras x max rank x 2 bytes
               x layers x (in + out of q, k, v, o, gate, up, down)
    A size is tried only if it divides the attention heads (vLLM splits heads over GPUs).
    kv_tokens = (budget - weights - sliding KV - overhead) // full-attention KV bytes per token.
    """
    per_gpu_budget = gpu.vram_gb * 1e9 * defaults.gpu_memory_utilization
    fixed = model.weight_bytes + sliding_kv_bytes(model) + model.lora_bytes
    per_token = kv_bytes_per_token(model)
    sizes = [c for c in TENSOR_PARALLEL_SIZES if c <= gpu.max_count]
    usable = [c for c in sizes if model.attention_heads % c == 0]
    need = 0.0
    for count in usable:
        budget = per_gpu_budget * count
        overhead = defaults.overhead_gib_per_gpu * GIB * count
        need = fixed + overhead + per_token * model.max_model_len
        if need <= budget:
            kv_tokens = int((budget - fixed - overhead) // per_token)
            return Fit(model, gpu, True, count, need / GIB, budget / GIB, kv_tokens)
    largest = usable[-1]  # 1 always divides
    reason = (
        f"needs {need / GIB:.1f} GiB at max_model_len {model.max_model_len}, more than "
        f"{largest} x {gpu.vram_gb:g} GB x {defaults.gpu_memory_utilization:g} allows"
    )
    if skipped := [c for c in sizes if c not in usable]:
        reason += (f" (tensor-parallel size {' or '.join(map(str, skipped))} does not divide "
                   f"its {model.attention_heads} attention heads)")
    return Fit(model, gpu, False, 0, need / GIB, per_gpu_budget * largest / GIB, 0, reason)


# ## The matrix and its names


def find_adapter(models, name: str) -> tuple[Model, Adapter] | None:
    """An adapter by its name or as `<base model>:<adapter>` (any of the base's names)."""
    wanted = name.strip().lower()
    base, _, adapter_name = wanted.rpartition(":")
    for model in models:
        if base and base not in (alias.lower() for alias in model.aliases):
            continue
        for adapter in model.adapters:
            if adapter.name.lower() == (adapter_name if base else wanted):
                return model, adapter
    return None


def gpu_app_name(gpu_key: str) -> str:
    return f"vllm-{gpu_key}"


def legacy_key(model_key: str, gpu_key: str) -> str:
    return f"{model_key}-{gpu_key}"


def legacy_app_name(model_key: str, gpu_key: str) -> str:
    return f"vllm-{legacy_key(model_key, gpu_key)}"


def endpoint_url_pattern(app_name: str) -> str:
    """Modal names a web function's URL after the workspace, the app and the function."""
    return f"https://<workspace>--{app_name}-serve.modal.run"


@dataclass(frozen=True)
class Matrix:
    defaults: Defaults
    gpus: dict[str, GPU]
    models: dict[str, Model]
    path: Path

    def gpu(self, key: str) -> GPU:
        found = self.gpus.get(key.strip().lower())
        if found is None:
            raise UsageError(f"unknown GPU '{key}'; valid GPU keys: {', '.join(self.gpus)}")
        return found

    def resolve_model(self, name: str) -> Model:
        """Full name, Hugging Face id or short key, in any letter case."""
        wanted = name.strip().lower()
        for model in self.models.values():
            if wanted in (alias.lower() for alias in model.aliases):
                return model
        raise UsageError(f"unknown model '{name}'; valid models: {', '.join(self.models)}")

    def fit(self, model: Model, gpu: GPU) -> Fit:
        if model.gpus is not None and gpu.key not in model.gpus:
            return Fit(model, gpu, False, 0, 0.0, 0.0, 0, f"{gpu.key} not in the model's gpus")
        return fit_on_gpu(model, gpu, self.defaults)

    def fits_on(self, gpu: GPU) -> list[Fit]:
        """Every model's fit on one GPU type, in file order, fitting or not."""
        return [self.fit(model, gpu) for model in self.models.values()]

    def legacy_cells(self) -> list[Fit]:
        """Every model x GPU pair that fits: one legacy app each."""
        return [f for gpu in self.gpus.values() for f in self.fits_on(gpu) if f.fits]

    def parse_legacy_key(self, key: str) -> Fit:
        """`<model>-<gpu>` (e.g. gemma-3-12b-l40s) to its cell; the GPU is the known suffix."""
        wanted = key.strip().lower()
        for gpu in self.gpus.values():
            suffix = f"-{gpu.key}"
            if wanted.endswith(suffix) and wanted[: -len(suffix)] in self.models:
                return self.fit(self.models[wanted[: -len(suffix)]], gpu)
        examples = ", ".join(legacy_key(m, g) for m in list(self.models)[:1] for g in self.gpus)
        raise UsageError(
            f"unknown model-GPU key '{key}'; expected <model>-<gpu> with models "
            f"{', '.join(self.models)} and GPUs {', '.join(self.gpus)} (e.g. {examples})"
        )


# ## Loading: YAML problems and schema problems become one line each


def _duplicate_keys(where: str, root) -> list[str]:
    """PyYAML keeps the last of two equal keys; a duplicate model must be an error instead.

    Walks the composed node tree (before any value is built) so that every
    duplicate is reported with its line and the path of the mapping holding it.
    """
    import yaml

    problems: list[str] = []
    seen_nodes: set[int] = set()  # aliases may share (or even nest) nodes

    def walk(node, path: tuple[str, ...]) -> None:
        if id(node) in seen_nodes:
            return
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[tuple[str, str], int] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                    walk(value_node, path)
                    continue
                identity = (key_node.tag, key_node.value)
                mark = key_node.start_mark
                if identity in first:
                    problems.append(
                        f"{where}: line {mark.line + 1}, column {mark.column + 1}: "
                        f"{'.'.join(path) or '(top level)'}: duplicate key '{key_node.value}' "
                        f"(first at line {first[identity]})"
                    )
                else:
                    first[identity] = mark.line + 1
                walk(value_node, (*path, key_node.value))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                walk(item, (*path, str(index)))

    if root is not None:
        walk(root, ())
    return problems


_MESSAGES = {
    "unexpected_keyword_argument": "unknown key (check its spelling)",
    "missing": "required key is missing",
    "dataclass_type": "expected a mapping",
}


def _schema_lines(where: str, error) -> list[str]:
    lines = []
    for item in error.errors():
        path = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = _MESSAGES.get(item["type"])
        if message is None:
            message = item["msg"]
            if isinstance(item.get("input"), (bool, int, float, str)):
                message += f" (got {item['input']!r})"
        lines.append(f"{where}: {path}: {message}")
    return lines


def _cross_check(where: str, parsed: MatrixFile) -> list[str]:
    """What one field's type cannot say: references, collisions, consistency."""
    problems = []
    key_pattern = re.compile(r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$")
    for section, keys in (("gpus", parsed.gpus), ("models", parsed.models)):
        if not keys:
            problems.append(f"{where}: {section}: define at least one entry")
        for key in keys:
            if not key_pattern.match(key):
                problems.append(f"{where}: {section}.{key}: keys are lower-case letters, "
                                "digits, '.' and '-'")
    for key, gpu in parsed.gpus.items():  # "H100!" pins the type: Modal may run "H100" on an H200
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]*[!+]?", gpu.modal_gpu):
            problems.append(f"{where}: gpus.{key}.modal_gpu: '{gpu.modal_gpu}' is not a Modal GPU "
                            "type such as L40S, A100-80GB, H100 or H100! (the count comes from "
                            "the fit check)")
    owner: dict[str, str] = {}
    for key, model in parsed.models.items():
        at = f"{where}: models.{key}"
        for gpu_key in model.gpus or ():
            if gpu_key not in parsed.gpus:
                problems.append(f"{at}.gpus: unknown GPU '{gpu_key}' "
                                f"(defined: {', '.join(parsed.gpus)})")
        if model.sliding_window and model.sliding_window.layers >= model.layers:
            problems.append(f"{at}.sliding_window.layers: must be fewer than layers "
                            f"({model.layers})")
        if model.kv_heads > model.attention_heads:
            problems.append(f"{at}.kv_heads: cannot exceed attention_heads "
                            f"({model.attention_heads})")
        for alias in dict.fromkeys(a.lower() for a in (key, model.name, model.huggingface_id)
                                   if a):
            if owner.get(alias, key) != key:
                problems.append(f"{at}: name '{alias}' collides with model '{owner[alias]}' "
                                "(names are matched without regard to case)")
            owner.setdefault(alias, key)
        problems += _adapter_problems(at, key, model, owner)
        for gpu_key in parsed.gpus:
            base = key.removesuffix(f"-{gpu_key}")
            if base != key and base in parsed.models:
                problems.append(f"{at}: key reads as model '{base}' on GPU '{gpu_key}'; "
                                "rename it so legacy keys stay unambiguous")
    return problems


def _adapter_problems(at: str, key: str, model: Model, owner: dict[str, str]) -> list[str]:
    """Adapter names share the model namespace: a request's `model` may name either."""
    problems = []
    name_pattern = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    if model.adapters and not (model.hidden_size and model.intermediate_size):
        problems.append(f"{at}: hidden_size and intermediate_size are required with adapters "
                        "(they size vLLM's LoRA buffers in the fit check)")
    for i, adapter in enumerate(model.adapters):
        here = f"{at}.adapters.{i}"
        if not name_pattern.match(adapter.name):
            problems.append(f"{here}.name: '{adapter.name}' must be letters, digits, '.', '_' "
                            "and '-' (no ':', '=' or '/')")
        if adapter.rank > LORA_RANKS[-1]:
            problems.append(f"{here}.rank: {adapter.rank} is above vLLM's largest LoRA rank "
                            f"({LORA_RANKS[-1]})")
        parts = adapter.path.split("/")
        if adapter.path.startswith("/") or ".." in parts or not all(parts):
            problems.append(f"{here}.path: '{adapter.path}' must be a relative path inside the "
                            "adapters volume, without '..'")
        alias = adapter.name.lower()
        if alias in owner:
            problems.append(f"{here}.name: '{adapter.name}' collides with '{owner[alias]}' "
                            "(names are matched without regard to case)")
        owner.setdefault(alias, f"{key}:{adapter.name}")
    if model.max_loras and model.max_loras > len(model.adapters):
        problems.append(f"{at}.max_loras: {model.max_loras} is more than its "
                        f"{len(model.adapters)} adapter(s)")
    return problems


def _validate(path: Path, text: str) -> Matrix:
    import yaml
    from pydantic import TypeAdapter, ValidationError

    where = str(path)
    try:
        duplicates = _duplicate_keys(where, yaml.compose(text, Loader=yaml.SafeLoader))
        if duplicates:
            raise ConfigError("\n".join(duplicates))
        raw = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{where}: {line}{exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with defaults, gpus and models")
    globals().update(_constrained_types())  # what the schema's annotations name
    try:
        parsed = TypeAdapter(MatrixFile).validate_python(raw)
    except ValidationError as exc:
        raise ConfigError("\n".join(_schema_lines(where, exc))) from None
    problems = _cross_check(where, parsed)
    if problems:
        raise ConfigError("\n".join(problems))
    gpus = {k: dataclasses.replace(g, key=k) for k, g in parsed.gpus.items()}
    models = {
        k: dataclasses.replace(m, key=k, name=m.name or m.huggingface_id)
        for k, m in parsed.models.items()
    }
    return Matrix(parsed.defaults, gpus, models, path)


def _cache_key(data: bytes) -> bytes:
    """What a cached matrix is valid for: exactly this schema (this file) and these bytes."""
    return Path(__file__).read_bytes() + b"\0" + data


def _cache_file(key: bytes) -> Path:
    # A checksum only names the file; the full key stored inside is compared on reading,
    # so a collision costs a validation, never a wrong matrix (and no hashlib: ~2 ms).
    folder = os.environ.get("MODAL_VLLM_CACHE_DIR") or Path(__file__).with_name(".cache")
    return Path(folder) / f"matrix-{zlib.crc32(key):08x}-{len(key)}.pickle"


# What unpickling a truncated, corrupt or outdated file can raise.
_CACHE_ERRORS = (OSError, EOFError, pickle.UnpicklingError, AttributeError, ImportError,
                 IndexError, KeyError, TypeError, ValueError)


def _read_cache(key: bytes) -> Matrix | None:
    """The matrix cached for exactly `key`, or None (then: validate again)."""
    try:
        with _cache_file(key).open("rb") as f:
            stored_key, matrix = pickle.load(f)
    except _CACHE_ERRORS:
        return None
    return matrix if stored_key == key and isinstance(matrix, Matrix) else None


def _write_cache(key: bytes, matrix: Matrix) -> None:
    cache = _cache_file(key)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(pickle.dumps((key, matrix)))
        tmp.replace(cache)  # atomic: a concurrent reader sees the old file or the new one
    except OSError:
        pass  # a read-only checkout (e.g. inside a container) just validates each time


def load(path: str | Path = DEFAULT_PATH) -> Matrix:
    """Read and validate a matrix file; raise ConfigError with one line per problem.

    A file already validated (same bytes, same schema) is read back from a
    cache beside this module, so fast commands need neither yaml nor pydantic.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    key = _cache_key(data)
    cached = _read_cache(key)
    if cached is not None:
        return dataclasses.replace(cached, path=path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    matrix = _validate(path, text)
    _write_cache(key, matrix)
    return matrix


def parse_duration(text: str) -> int:
    """'90s', '15m', '2h' or plain seconds, to seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not match:
        raise UsageError(f"cannot read duration '{text}'; use e.g. 90s, 15m or 2h")
    value = float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[match[2]]
    return max(1, math.ceil(value))
