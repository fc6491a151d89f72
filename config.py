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

# ## What vLLM 0.33 does, as its own source does it (paths under vllm/ in the wheel)

# config/model.py _FLOAT16_NOT_SUPPORTED_MODELS: `--dtype float16` makes vLLM exit at
# start for these config.json model_types ("Numerical instability").
FLOAT16_REFUSED_MODEL_TYPES = ("gemma2", "gemma3", "gemma3_text", "glm4")
# Architectures whose vLLM class sets `is_3d_moe_weight = True`
# (model_executor/models/gpt_oss.py, qwen3_vl_moe.py, qwen3_5.py,
# qwen3_omni_moe_thinker.py, interns1_pro.py; scripts/vllm_contract.py checks the list):
# lora/model_manager.py then wraps their experts in FusedMoE3DWithLoRA (gate and up
# fused), every other MoE in FusedMoEWithLoRA.
FUSED_3D_MOE_ARCHITECTURES = (
    "GptOssForCausalLM", "InternS1ProForConditionalGeneration",
    "Qwen3OmniMoeForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration",
    "Qwen3_5MoeForConditionalGeneration",
)
# tool_parsers/__init__.py _TOOL_PARSERS_TO_REGISTER: any other --tool-call-parser (without
# --tool-parser-plugin) is a KeyError in validate_api_server_args: vLLM exits at start.
TOOL_PARSERS = (
    "apertus", "beam", "cohere_command3", "cohere_command4", "deepseek_v3", "deepseek_v31",
    "deepseek_v32", "deepseek_v4", "deepseek_v41", "dots", "ernie45", "functiongemma",
    "gemma4", "gigachat3", "glm45", "glm47", "granite", "granite-20b-fc", "granite4",
    "hermes", "hf", "hunyuan_a13b", "hy_v3", "hy_v4", "inkling", "internlm", "jamba",
    "k2_horizon", "kimi_k2", "kimi_k3", "lfm2", "ling3", "llama3_json", "llama4_json",
    "llama4_pythonic", "longcat", "mimo", "minicpm5", "minimax_m2", "minimax_m3", "mistral",
    "muse", "muse_glimmer", "musespark1x", "olmo3", "openai", "phi4_mini_json", "plamo3",
    "poolside_v1", "pythonic", "qwen3_coder", "qwen3_json", "qwen3_xml", "seed_oss", "step3",
    "step3p5", "step5", "xlam",
)
KV_BLOCK_TOKENS = 16  # config/cache.py CacheConfig.DEFAULT_BLOCK_SIZE
KV_BYTES = 2  # KV cache dtype "auto" = the model's dtype (bf16/fp16), also with fp8 weights
LORA_BYTES = 2  # LoRAConfig.lora_dtype "auto" = the model's (activation) dtype
# config/vllm.py VllmConfig.max_concurrent_batches: async scheduling is on by default
# (uniproc and multiproc executors support it), so 2 batches are in flight at once and
# sliding-window layers keep blocks for 2 x max_num_batched_tokens (max_in_flight_tokens).
BATCHES_IN_FLIGHT = 2


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

    @property
    def default_max_num_batched_tokens(self) -> int:
        """vLLM's default for its OpenAI server on this GPU (engine/arg_utils.py
        EngineArgs.get_batch_defaults): 16384 from 160 GiB of device memory (B200), 8192
        from 70 GiB unless an A100 (H100, H200), else 2048 (L40S, A100)."""
        gib = self.vram_gb * 1e9 / GIB
        if gib >= 160:
            return 16384
        if gib >= 70 and "a100" not in self.modal_gpu.lower():
            return 8192
        return 2048


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
class MoE:
    """A mixture-of-experts MLP in every layer (config.json: num_experts, moe_intermediate_size).

    Shared experts and dense layers beside the experts (DeepSeek, Qwen2-MoE) are not
    modelled: their LoRA buffers would be missing from the fit check.
    """

    __pydantic_config__ = _STRICT
    experts: PositiveInt
    expert_intermediate_size: PositiveInt


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
    # config.json's `architectures[0]` and `model_type`: what vLLM picks its implementation
    # and its checks by. Needed where they change what vLLM does: `model_type` with
    # dtype float16, `architecture` with adapters on a MoE model.
    architecture: str | None = None
    model_type: str | None = None
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
    hidden_size: PositiveInt | None = None  # sizes LoRA buffers (needed with adapters)
    intermediate_size: PositiveInt | None = None  # dense MLP width (adapters, dense models)
    moe: MoE | None = None  # mixture of experts: sizes the experts' LoRA buffers

    @property
    def lora_rank(self) -> int:
        """vLLM's --max-lora-rank: the smallest rank it accepts that holds every adapter."""
        top = max((a.rank for a in self.adapters), default=0)
        return next((r for r in LORA_RANKS if r >= top), 0) if self.adapters else 0

    @property
    def loras_on_gpu(self) -> int:
        return (self.max_loras or len(self.adapters)) if self.adapters else 0

    def lora_bytes(self, gpus: int = 1) -> int:
        """GPU memory vLLM allocates for LoRA slots, over all `gpus` of a replica.

        As lora/layers/*.py create_lora_weights allocate them: per adapter slot
        (--max-loras), at --max-lora-rank r, in the model's dtype, in every layer. Per GPU
        of a tensor-parallel size t (a column-parallel layer keeps A whole and splits B,
        a row-parallel one splits A and keeps B whole, a replicated one keeps both):
          q, k, v (column): A 3 x r x h, B r x (q + 2 kv) / t   (kv heads: at least 1 per GPU)
          o (row):          A r x q / t, B r x h
          dense MLP:        gate+up (column) A 2 x r x h, B r x 2I / t; down (row)
                            A r x I / t, B r x h
          MoE experts:      E x r x (2h + 3I / t) fused 3-D (FusedMoE3DWithLoRA: w13 A
                            r x h, w13 B 2I / t x r, w2 A r x I / t, w2 B h x r), or
                            E x r x (3h + 3I / t) (FusedMoEWithLoRA: w1 and w3 A apart)
          MoE router gate (replicated): r x (h + E)
        Not counted: lm_head and embed_tokens, which vLLM wraps too for models whose class
        lists them in `embedding_modules` (r x (vocab + h) per slot each, ~0.1 GB).
        """
        if not self.adapters:
            return 0
        t, h = gpus, self.hidden_size or 0
        kv = max(1, self.kv_heads // t) * self.head_dim  # per GPU, as QKVParallelLinear
        per_gpu = 4 * h + 2 * self.attention_heads * self.head_dim // t + 2 * kv
        if self.moe:
            experts, mlp = self.moe.experts, self.moe.expert_intermediate_size
            fused = self.architecture in FUSED_3D_MOE_ARCHITECTURES
            per_gpu += experts * ((2 if fused else 3) * h + 3 * mlp // t) + (h + experts)
        else:
            per_gpu += 3 * h + 3 * (self.intermediate_size or 0) // t
        return self.loras_on_gpu * self.lora_rank * LORA_BYTES * self.layers * per_gpu * t

    @property
    def aliases(self) -> list[str]:
        """Every name a client may send for this model (matched without regard to case)."""
        return list(dict.fromkeys([self.name, self.key, self.huggingface_id]))

    @property
    def weight_bytes(self) -> float:
        return self.params_b * 1e9 * BYTES_PER_PARAM[self.quantization or self.dtype]


@dataclass(frozen=True, kw_only=True)
class Billing:
    """Modal's rates for CPU and memory (models.yaml `billing:`, with when and where they
    were read). Without the section, these figures, as models.yaml records them."""

    __pydantic_config__ = _STRICT
    cpu_core_usd_per_hour: NonNegative = 0.04716  # $0.0000131 per physical core per second
    memory_gib_usd_per_hour: NonNegative = 0.007992  # $0.00000222 per GiB per second
    read_on: str = "2026-06-27"
    source: str = "https://www.beam.cloud/blog/modal-pricing-explained"


@dataclass(frozen=True, kw_only=True)
class MatrixFile:
    __pydantic_config__ = _STRICT
    defaults: Defaults
    gpus: dict[str, GPU]
    models: dict[str, Model]
    billing: Billing = Billing()


# ## Modal's bill: GPUs, and the CPU cores and memory each container reserves
#
# Modal bills CPU and memory on GPU containers too, at the greater of reservation and
# use; unasked, a container reserves 0.125 core and 128 MiB (modal.com/docs/guide/resources).
# vLLM uses far more than that, so the pools reserve what vLLM needs (a reservation also
# guarantees it: above it the host may throttle CPU and reclaim memory) and the prices
# count it. The sizes, for `vllm serve` 0.33 in one container:
POOL_CPU_CORES = 2.0  # the API server (HTTP, tokenizing, detokenizing) and the engine core
#                       (the scheduler's loop, busy while requests run): a core each
POOL_CPU_CORES_PER_GPU = 1.0  # one worker process per GPU launches its kernels; with
#                               --enforce-eager every step is Python on the CPU
POOL_CPU_CORES_VISION = 1.0  # decoding and resizing images (the HF image processor runs
#                              in the API server) for models with `vision`
POOL_MEMORY_GIB = 8  # API server + engine core: each imports torch, transformers and vLLM
#                      (~2 GiB each), the tokenizer, request bodies in flight (up to 32 x 32 MiB)
POOL_MEMORY_GIB_PER_GPU = 6  # a worker per GPU: torch, CUDA's host-side context, NCCL,
#                              pinned staging buffers while the weights load (safetensors
#                              shards stream from the Volume through the page cache, which
#                              the kernel reclaims: not reserved)
# A GPU-snapshot pool also reserves its whole weights (and LoRA slots): `POST /sleep?level=1`
# moves them to host memory before Modal snapshots it (vllm/device_allocator/
# sleep_mode_backend.py: level 1 offloads the "weights" tag to host RAM).
ROUTER_CPU_CORES = 1.0  # the GPU apps' CPU router only relays bytes: one core is plenty
ROUTER_MEMORY_MIB = 1024  # room for 32 MiB request bodies in flight


@dataclass(frozen=True)
class Bill:
    """What one running container reserves and costs per hour on Modal."""

    gpu_usd_per_hour: float
    cpu_cores: float
    memory_mib: int
    billing: Billing

    @property
    def cpu_usd_per_hour(self) -> float:
        return self.cpu_cores * self.billing.cpu_core_usd_per_hour

    @property
    def memory_usd_per_hour(self) -> float:
        return self.memory_mib / 1024 * self.billing.memory_gib_usd_per_hour

    @property
    def usd_per_hour(self) -> float:
        return self.gpu_usd_per_hour + self.cpu_usd_per_hour + self.memory_usd_per_hour

    def split(self) -> dict[str, float]:
        """GPU, CPU and memory $/hour (their sum is `usd_per_hour`)."""
        return {"gpu": self.gpu_usd_per_hour, "cpu": self.cpu_usd_per_hour,
                "memory": self.memory_usd_per_hour}


def pool_reservation(model: Model, count: int, *, snapshot: bool) -> tuple[float, int]:
    """CPU cores and memory (MiB) a model's GPU container reserves on `count` GPUs."""
    cores = POOL_CPU_CORES + POOL_CPU_CORES_PER_GPU * count
    cores += POOL_CPU_CORES_VISION if model.vision else 0.0
    mib = (POOL_MEMORY_GIB + POOL_MEMORY_GIB_PER_GPU * count) * 1024
    if snapshot:
        mib += math.ceil((model.weight_bytes + model.lora_bytes(count)) / 2**20)
    return cores, mib


def router_bill(billing: Billing) -> Bill:
    """The CPU router of a GPU app: one per app, up while any request comes."""
    return Bill(0.0, ROUTER_CPU_CORES, ROUTER_MEMORY_MIB, billing)


# ## Fit check: weights + LoRA slots + overhead + the KV cache vLLM reserves, against VRAM


@dataclass(frozen=True)
class Fit:
    """How one model sits on one GPU type: the smallest tensor-parallel size that works."""

    model: Model
    gpu: GPU
    fits: bool
    count: int  # GPUs per replica (= --tensor-parallel-size); 0 when it does not fit
    need_gib: float  # weights + LoRA + overhead + one max-length request's KV, all GPUs
    budget_gib: float  # VRAM x gpu_memory_utilization, all GPUs
    kv_tokens: int  # vLLM's "KV cache size: N tokens" (its max concurrency x max_model_len)
    reason: str = ""
    billing: Billing = Billing()

    @property
    def gpu_string(self) -> str:
        return self.gpu.modal_string(self.count) if self.fits else ""

    def bill(self, *, snapshot: bool | None = None) -> Bill:
        """One replica's reservation and $/hour. A GPU app's pool snapshots a model with
        `snapshot: true` on one GPU; pass snapshot=False for a legacy app's container."""
        if not self.fits:
            return Bill(0.0, 0.0, 0, self.billing)
        if snapshot is None:
            snapshot = self.model.snapshot and self.count == 1
        cores, mib = pool_reservation(self.model, self.count, snapshot=snapshot)
        return Bill(self.gpu.usd_per_hour * self.count, cores, mib, self.billing)

    @property
    def usd_per_hour(self) -> float:
        """What one running replica of this cell costs per hour: GPUs + CPU + memory."""
        return self.bill().usd_per_hour

    @property
    def usd_per_hour_split(self) -> dict[str, float]:
        """The same, split: {"gpu": ..., "cpu": ..., "memory": ...}."""
        return self.bill().split()


def max_num_batched_tokens(model: Model, gpu: GPU) -> int:
    """The per-step token budget vLLM runs with: the model's --max-num-batched-tokens in
    extra_args, else vLLM's default for that GPU."""
    args = list(model.extra_args)
    for i, arg in enumerate(args):
        if arg.startswith("--max-num-batched-tokens="):
            return int(arg.split("=", 1)[1])
        if arg == "--max-num-batched-tokens" and i + 1 < len(args):
            return int(args[i + 1])
    return gpu.default_max_num_batched_tokens


@dataclass(frozen=True)
class KVLayout:
    """vLLM's KV cache for one model on each GPU of a replica (v1/core/kv_cache_planning.py).

    Layers of one attention type share a block table; a hybrid model's layers are cut
    into groups of equal size (the smaller type's layer count, or the larger's when it is
    under 1.5 times the smaller), the last group of a type padded. All groups draw blocks
    from one pool, each block holding `group_size` layers' pages.
    """

    page_bytes: int  # one layer's block on one GPU: 16 tokens x K and V x kv heads x dim x 2
    group_size: int
    full_groups: int
    sliding_groups: int
    full_blocks: int  # one max_model_len request, per full-attention group
    sliding_blocks: int  # the same per sliding-window group (0 without sliding layers)

    @property
    def bytes_per_block(self) -> int:
        return self.group_size * self.page_bytes

    @property
    def blocks_per_request(self) -> int:
        return self.full_groups * self.full_blocks + self.sliding_groups * self.sliding_blocks


def kv_layout(model: Model, gpu: GPU, count: int) -> KVLayout:
    """A request at max_model_len takes cdiv(max_model_len, 16) blocks in a full-attention
    group (FullAttentionSpec.max_memory_usage_bytes) and, in a sliding-window group,
    cdiv(min(window - 1 + tokens in flight, max_model_len), 16) + 1
    (SlidingWindowSpec.max_admission_blocks_per_request: the window's last tokens stay
    while in-flight steps finish; +1 as a window need not start on a block boundary),
    where tokens in flight = 2 batches x max_num_batched_tokens (VllmConfig.max_in_flight_tokens).
    """
    kv_heads = max(1, model.kv_heads // count)  # per GPU; replicated when t > kv heads
    page = KV_BLOCK_TOKENS * 2 * kv_heads * model.head_dim * KV_BYTES
    length = model.max_model_len
    full_blocks = -(-length // KV_BLOCK_TOKENS)
    if not model.sliding_window:
        return KVLayout(page, model.layers, 1, 0, full_blocks, 0)
    sliding = model.sliding_window.layers
    full = model.layers - sliding
    small, large = min(full, sliding), max(full, sliding)
    group = large if large < small * 1.5 else small
    in_flight = BATCHES_IN_FLIGHT * max_num_batched_tokens(model, gpu)
    kept = min(model.sliding_window.window - 1 + in_flight, length)
    sliding_blocks = -(-kept // KV_BLOCK_TOKENS) + 1
    return KVLayout(page, group, -(-full // group), -(-sliding // group), full_blocks,
                    sliding_blocks)


def fit_on_gpu(model: Model, gpu: GPU, defaults: Defaults, billing: Billing = Billing()) -> Fit:
    """The smallest tensor-parallel size (1, 2, 4, 8) whose GPUs hold the model.

    Per GPU of a replica of `count` GPUs, with GB = 1e9 bytes, as vLLM 0.33 checks at start
    (v1/core/kv_cache_planning.py get_kv_cache_configs):
      budget    = vram_gb x 1e9 x gpu_memory_utilization
      weights   = params_b x 1e9 x bytes per parameter (2 for bf16/fp16, 1 for fp8) / count
      LoRA      = Model.lora_bytes(count) / count (adapter slots, with adapters)
      overhead  = overhead_gib_per_gpu x 2**30 (activations, CUDA context, NCCL buffers)
      KV        = bytes per block x (blocks one max_model_len request takes + 1 null block)
                  (KVLayout: full-attention and sliding-window groups as vLLM forms them)
      fits when weights + LoRA + overhead + KV <= budget
    A size is tried only if it divides the attention heads (vLLM splits heads over GPUs).
    kv_tokens, as vLLM reports its KV cache size: blocks = (budget - weights - LoRA -
    overhead) // bytes per block; kv_tokens = int(blocks / blocks per request x max_model_len).
    """
    per_gpu_budget = gpu.vram_gb * 1e9 * defaults.gpu_memory_utilization
    overhead = defaults.overhead_gib_per_gpu * GIB
    sizes = [c for c in TENSOR_PARALLEL_SIZES if c <= gpu.max_count]
    usable = [c for c in sizes if model.attention_heads % c == 0]
    need = 0.0
    for count in usable:
        layout = kv_layout(model, gpu, count)
        fixed = (model.weight_bytes + model.lora_bytes(count)) / count + overhead
        need = fixed + layout.bytes_per_block * (layout.blocks_per_request + 1)
        if need <= per_gpu_budget:
            blocks = int((per_gpu_budget - fixed) // layout.bytes_per_block)
            kv_tokens = int(blocks / layout.blocks_per_request * model.max_model_len)
            return Fit(model, gpu, True, count, need * count / GIB,
                       per_gpu_budget * count / GIB, kv_tokens, billing=billing)
        need *= count
    largest = usable[-1]  # 1 always divides
    reason = (
        f"needs {need / GIB:.1f} GiB at max_model_len {model.max_model_len}, more than "
        f"{largest} x {gpu.vram_gb:g} GB x {defaults.gpu_memory_utilization:g} allows"
    )
    if skipped := [c for c in sizes if c not in usable]:
        reason += (f" (tensor-parallel size {' or '.join(map(str, skipped))} does not divide "
                   f"its {model.attention_heads} attention heads)")
    return Fit(model, gpu, False, 0, need / GIB, per_gpu_budget * largest / GIB, 0, reason,
               billing=billing)


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
    billing: Billing = Billing()

    @property
    def router_bill(self) -> Bill:
        """The CPU router each GPU app runs in front of its pools (legacy apps have none)."""
        return router_bill(self.billing)

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
            return Fit(model, gpu, False, 0, 0.0, 0.0, 0, f"{gpu.key} not in the model's gpus",
                       billing=self.billing)
        return fit_on_gpu(model, gpu, self.defaults, self.billing)

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
        problems += _refused_by_vllm(at, model)
        if model.tool_parser and model.tool_parser not in TOOL_PARSERS and not any(
                a.startswith("--tool-parser-plugin") for a in model.extra_args):
            problems.append(f"{at}.tool_parser: '{model.tool_parser}' is not a tool parser of "
                            "vLLM 0.33, which would exit at start (e.g. hermes, pythonic, "
                            "llama3_json; or add --tool-parser-plugin to extra_args)")
        problems += _adapter_problems(at, key, model, owner)
        for gpu_key in parsed.gpus:
            base = key.removesuffix(f"-{gpu_key}")
            if base != key and base in parsed.models:
                problems.append(f"{at}: key reads as model '{base}' on GPU '{gpu_key}'; "
                                "rename it so legacy keys stay unambiguous")
    return problems


def _refused_by_vllm(at: str, model: Model) -> list[str]:
    """What vLLM 0.33 refuses at start, found before anything is deployed."""
    if model.dtype != "float16":
        return []
    if model.model_type is None:
        refused = ", ".join(FLOAT16_REFUSED_MODEL_TYPES)
        return [(f"{at}.model_type: required with dtype float16 (config.json's model_type: "
                 f"vLLM 0.33 refuses float16 for {refused})")]
    if model.model_type in FLOAT16_REFUSED_MODEL_TYPES:
        return [(f"{at}.dtype: vLLM 0.33 refuses float16 for model_type {model.model_type} "
                 "(numerical instability) and would exit at start; use bfloat16")]
    return []


def _adapter_problems(at: str, key: str, model: Model, owner: dict[str, str]) -> list[str]:
    """Adapter names share the model namespace: a request's `model` may name either."""
    problems = []
    name_pattern = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    if model.adapters:
        needs = [] if model.hidden_size else ["hidden_size"]
        if model.moe and not model.architecture:
            needs.append("architecture")  # decides vLLM's fused 3-D or 2-D experts layout
        if not model.moe and not model.intermediate_size:
            needs.append("intermediate_size (or moe)")
        if needs:
            problems.append(f"{at}: {' and '.join(needs)} required with adapters (they size "
                            "vLLM's LoRA buffers in the fit check)")
    for i, adapter in enumerate(model.adapters):
        here = f"{at}.adapters.{i}"
        # entrypoints/common/cli_args.py LoRAParserAction: a --lora-modules value with a
        # comma is read as JSON, which `name=path` is not: vLLM exits at start.
        for field in ("name", "path"):
            if "," in getattr(adapter, field):
                problems.append(f"{here}.{field}: '{getattr(adapter, field)}' contains ',', "
                                "which makes vLLM's --lora-modules read it as JSON and exit")
        if "," not in adapter.name and not name_pattern.match(adapter.name):
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
    return Matrix(parsed.defaults, gpus, models, path, parsed.billing)


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


DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*")  # '90s', '15m', '2h' or seconds


def parse_duration(text: str) -> int:
    """'90s', '15m', '2h' or plain seconds, to seconds."""
    match = DURATION.fullmatch(text)
    if not match:
        raise UsageError(f"cannot read duration '{text}'; use e.g. 90s, 15m or 2h")
    value = float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[match[2]]
    return max(1, math.ceil(value))
