"""The engine's one configuration dataclass, validated on construction.

Derived values (state slots, KV blocks and the length limit, which depend on the model and the memory budget)
start as None and are written back by the model runner once it has sized the caches.
"""

from __future__ import annotations

from dataclasses import dataclass

CHECKPOINT_ALIGN = 64  # == kda_serving.ops.contract.CHECKPOINT_ALIGN; repeated so this module needs no torch
_DEVICES = ("cpu", "cuda")
_DTYPES = ("float32", "bfloat16")
QUANTIZATIONS = (None, "fp8")  # == kda_serving.model.fp8.QUANTIZATIONS
SCHEDULING_POLICIES = ("fcfs", "priority")  # engine/scheduler.py
# Drafts per verified decode: each costs a state slot for the step (the state after every token is kept until
# the draft is checked) and a token of the step's budget.
MAX_SPECULATIVE_TOKENS = 16


def _fail(kind, name, message):
    raise kind(f"EngineConfig: '{name}' {message}")


def _positive_int(name, value, allow_none=False):
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        _fail(TypeError, name, f"must be an int, got {type(value).__name__}")
    if value < 1:
        _fail(ValueError, name, f"must be >= 1, got {value}")


@dataclass
class EngineConfig:
    """Everything the engine needs to know before it loads a model.

    model: a checkpoint directory, or None for the embedded default model.
    device: "cpu" or "cuda" (optionally "cuda:N"). dtype: None picks float32 on CPU, bfloat16 on CUDA.
    max_num_seqs / max_num_batched_tokens: per-step limits on sequences and new tokens (prefills are chunked
    to fit the token budget).
    Caches: `num_state_slots` KDA state slots and `num_kv_blocks` paged MLA blocks of `block_size` tokens.
    Left None they are sized from the memory budget: on CUDA `gpu_memory_utilization` of the card minus the
    weights and the measured activation peak, on CPU `cpu_cache_bytes`; `state_memory_fraction` of the
    budget goes to state slots, the rest to KV blocks.
    Prefix cache: states are saved every `prefix_cache_interval` prompt tokens (a multiple of the kernel's
    64-token checkpoint alignment and of block_size), at branch points and at the end of every finished
    turn; it shares the slot and block pools with running requests and is evicted LRU when they need room.
    kda_state_dtype: "float32" (default) or "bfloat16" for the KDA recurrent states: bf16 halves their memory
    (more state slots in the same budget) and the decode's state traffic, at one bf16 rounding per step.
    quantization: None (default) or "fp8": the routed experts' weights in e4m3 with a scale per output channel,
    quantized while loading, their GEMMs in fp8 (model/fp8.py, docs/quantization.md): half the experts'
    memory (Kimi-Linear-48B fits an 80 GB card) and half the bytes a decode step reads from them. A model
    object passed to the engine has its experts quantized in place; one already in fp8 sets it to "fp8".
    fp8_fast_accumulation: with fp8 experts, their grouped GEMMs accumulate in Hopper's fast mode
    (MoE.fast_accumulation): 1.03-1.08x per MoE layer at 64-4,096 tokens, 1.33x at 8,192, at 3x the GEMMs'
    rounding error (still a fifth of e4m3's own). Off by default.
    enable_cuda_graphs: on CUDA, decode steps replay captured CUDA graphs (engine/cuda_graphs.py) when the
    model allows it (bf16, MoE on grouped GEMMs); False runs every step eagerly.
    prompt_graph_tokens: with CUDA graphs on, steps with prompt tokens of at most this many tokens (in all)
    replay piecewise graphs, the mixers eager between them (engine/prompt_graphs.py); 0 runs them eagerly.
    scheduling_policy: "fcfs" (first come first served) or "priority" (requests carry a priority, lower
    served first, and may preempt running requests of a lower one; engine/scheduler.py).
    num_speculative_tokens: 0 (off) or the most draft tokens a decode verifies per step (speculative decoding
    by prompt lookup, engine/ngram.py); drafts come from the last occurrence of the request's last
    prompt_lookup_max .. prompt_lookup_min tokens in its own context.
    async_scheduling: queue each step's forward before reading the previous step's tokens back, so that the
    host's scheduling and batch building overlap the GPU (docs/engine.md, Asynchronous scheduling). None (the
    default) turns it on on CUDA without speculative decoding, whose drafts need the tokens on the host.
    torch_compile: compile the model's plain torch pieces (norms, residual adds, the MoE router) with
    torch.compile, fusing their small kernels (KimiLinearModel.compile_plain_ops); None (the default) turns it
    on on CUDA, where it shortens decode steps, and off on the CPU.
    """

    model: str | None = None
    device: str = "cpu"
    dtype: str | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    block_size: int = 16
    num_state_slots: int | None = None
    num_kv_blocks: int | None = None
    gpu_memory_utilization: float = 0.85
    cpu_cache_bytes: int = 256 << 20
    state_memory_fraction: float = 0.5
    enable_prefix_caching: bool = True
    enable_cuda_graphs: bool = True
    prompt_graph_tokens: int = 512
    kda_state_dtype: str = "float32"
    quantization: str | None = None
    fp8_fast_accumulation: bool = False
    prefix_cache_interval: int = 256
    served_model_name: str | None = None
    seed: int = 0
    scheduling_policy: str = "fcfs"
    num_speculative_tokens: int = 0
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 4
    async_scheduling: bool | None = None
    torch_compile: bool | None = None

    def __post_init__(self):
        if self.model is not None and not isinstance(self.model, str):
            _fail(TypeError, "model", f"must be a path string or None, got {type(self.model).__name__}")
        if not isinstance(self.device, str) or self.device.split(":")[0] not in _DEVICES:
            _fail(ValueError, "device", f"must be one of {_DEVICES} (optionally 'cuda:N'), got {self.device!r}")
        if self.dtype is None:
            self.dtype = "float32" if self.device == "cpu" else "bfloat16"
        if self.dtype not in _DTYPES:
            _fail(ValueError, "dtype", f"must be one of {_DTYPES}, got {self.dtype!r}")
        if self.kda_state_dtype not in _DTYPES:
            _fail(ValueError, "kda_state_dtype", f"must be one of {_DTYPES}, got {self.kda_state_dtype!r}")
        if self.quantization not in QUANTIZATIONS:
            _fail(ValueError, "quantization", f"must be None or 'fp8', got {self.quantization!r}")
        if not isinstance(self.fp8_fast_accumulation, bool):
            _fail(TypeError, "fp8_fast_accumulation", f"must be a bool, got {self.fp8_fast_accumulation!r}")
        if self.fp8_fast_accumulation and self.quantization != "fp8":
            _fail(ValueError, "fp8_fast_accumulation", "needs quantization='fp8' (it sets how fp8 GEMMs accumulate)")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "prefix_cache_interval"):
            _positive_int(name, getattr(self, name))
        for name in ("max_model_len", "num_state_slots", "num_kv_blocks"):
            _positive_int(name, getattr(self, name), allow_none=True)
        _positive_int("cpu_cache_bytes", self.cpu_cache_bytes)
        if not isinstance(self.prompt_graph_tokens, int) or isinstance(self.prompt_graph_tokens, bool):
            _fail(TypeError, "prompt_graph_tokens", f"must be an int, got {type(self.prompt_graph_tokens).__name__}")
        if self.prompt_graph_tokens < 0:
            _fail(ValueError, "prompt_graph_tokens", f"must be >= 0, got {self.prompt_graph_tokens}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            _fail(
                ValueError,
                "max_num_batched_tokens",
                f"({self.max_num_batched_tokens}) must be >= max_num_seqs ({self.max_num_seqs}): every running "
                "sequence needs a token each step",
            )
        if self.block_size & (self.block_size - 1):
            _fail(ValueError, "block_size", f"must be a power of two, got {self.block_size}")
        interval = self.prefix_cache_interval
        if interval % CHECKPOINT_ALIGN or interval % self.block_size:
            _fail(
                ValueError,
                "prefix_cache_interval",
                f"must be a multiple of {CHECKPOINT_ALIGN} and of block_size={self.block_size}, got {interval}",
            )
        for name in ("gpu_memory_utilization", "state_memory_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 < value < 1.0):
                _fail(ValueError, name, f"must be a number in (0, 1), got {value!r}")
        for name in ("enable_prefix_caching", "enable_cuda_graphs"):
            if not isinstance(getattr(self, name), bool):
                _fail(TypeError, name, "must be a bool")
        if self.served_model_name is not None and not isinstance(self.served_model_name, str):
            _fail(TypeError, "served_model_name", "must be a string or None")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            _fail(TypeError, "seed", "must be an int")
        if not isinstance(self.num_speculative_tokens, int) or isinstance(self.num_speculative_tokens, bool):
            _fail(TypeError, "num_speculative_tokens", "must be an int")
        if not 0 <= self.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            _fail(ValueError, "num_speculative_tokens",
                  f"must be in [0, {MAX_SPECULATIVE_TOKENS}], got {self.num_speculative_tokens}")
        for name in ("prompt_lookup_min", "prompt_lookup_max"):
            _positive_int(name, getattr(self, name))
        if self.prompt_lookup_min > self.prompt_lookup_max:
            _fail(ValueError, "prompt_lookup_min",
                  f"({self.prompt_lookup_min}) must be <= prompt_lookup_max ({self.prompt_lookup_max})")
        if self.async_scheduling is None:
            self.async_scheduling = self.device != "cpu" and self.num_speculative_tokens == 0
        if not isinstance(self.async_scheduling, bool):
            _fail(TypeError, "async_scheduling", "must be a bool or None")
        if self.async_scheduling and self.num_speculative_tokens:
            _fail(ValueError, "async_scheduling",
                  "cannot be combined with speculative decoding (num_speculative_tokens > 0): drafts are proposed "
                  "from the tokens sampled last, which asynchronous scheduling reads back one step later")
        if self.torch_compile is None:
            self.torch_compile = self.device != "cpu"
        if not isinstance(self.torch_compile, bool):
            _fail(TypeError, "torch_compile", "must be a bool or None")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            _fail(ValueError, "scheduling_policy",
                  f"must be one of {SCHEDULING_POLICIES}, got {self.scheduling_policy!r}")
