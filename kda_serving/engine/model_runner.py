"""Owns the model and its caches: sizes the caches from the memory budget and executes one step."""

from __future__ import annotations

import logging

import torch

from ..model.batch import RaggedBatch, host_to_device
from ..model.mla_prefill import EXPANDED_BUDGET
from ..ops import indices_checked_by_caller
from .config import EngineConfig
from .scheduler import SchedulerOutput

log = logging.getLogger(__name__)


class ModelRunner:
    """Runs steps of `model` (the kda_serving.model API: forward(batch, caches), allocate_caches(...),
    state_slot_bytes(state_dtype), kv_block_bytes(block_size), max_model_len) on config.device.

    Sizing: state slots and KV blocks split the cache budget by config.state_memory_fraction. The budget is
    config.cpu_cache_bytes on the CPU; on CUDA it is gpu_memory_utilization of the card minus what is in use
    after loading (weights, other processes) minus the activation peak of a profiling step of
    max_num_batched_tokens tokens. Explicit num_state_slots / num_kv_blocks win. The derived values are
    written back into config.
    """

    def __init__(self, config: EngineConfig, model=None):
        self.config = config
        self.device = torch.device(config.device)
        if model is None:
            from ..model import load_model

            model = load_model(config.model, device=self.device, dtype=config.dtype,
                               quantization=config.quantization)
        elif config.quantization == "fp8" and getattr(model, "quantization", None) != "fp8":
            model.quantize_experts_()
        config.quantization = getattr(model, "quantization", config.quantization)
        if config.fp8_fast_accumulation:  # before any graph capture, which keeps it
            model.set_fp8_fast_accumulation(True)
        self.model = model
        if hasattr(model, "compile_plain_ops"):  # before the profiling step and the graph captures compile it
            model.compile_plain_ops(config.torch_compile)
        self.state_dtype = getattr(torch, config.kda_state_dtype)
        self._size_caches()
        self.graphs = None
        use_graphs = (config.enable_cuda_graphs and self.device.type == "cuda"
                      and getattr(model, "decode_capturable", False))
        # With graphs one KV block more than the block manager knows of: padding rows of a captured step write
        # their latent there; with speculation also one state slot more, where padding rows of a captured
        # verifying step write the states they would keep (cuda_graphs.py).
        self.num_kv_blocks = config.num_kv_blocks + (1 if use_graphs else 0)
        scratch_state = use_graphs and config.num_speculative_tokens > 0
        self.caches = model.allocate_caches(config.num_state_slots + scratch_state, self.num_kv_blocks,
                                            config.block_size, self.state_dtype)
        if use_graphs:
            from .cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(model, self.caches, config.max_num_seqs, config.block_size,
                                       config.max_model_len, scratch_slot=config.num_kv_blocks * config.block_size,
                                       max_width=config.num_speculative_tokens + 1,
                                       scratch_state_slot=config.num_state_slots if scratch_state else None,
                                       any_length=getattr(model, "decode_any_length", False))
            self.graphs.capture_batch_buckets()
        self.prompt_graphs = None
        prompt_tokens = min(config.prompt_graph_tokens, config.max_num_batched_tokens)
        if use_graphs and prompt_tokens and hasattr(model, "piece"):
            from .prompt_graphs import PromptGraphs

            self.prompt_graphs = PromptGraphs(model, self.caches, prompt_tokens,
                                              scratch_slot=config.num_kv_blocks * config.block_size,
                                              pool=self.graphs.pool)
            self.prompt_graphs.capture_all()

    def _size_caches(self) -> None:
        cfg, model = self.config, self.model
        slot_bytes, block_bytes = model.state_slot_bytes(self.state_dtype), model.kv_block_bytes(cfg.block_size)
        if block_bytes == 0 and cfg.num_kv_blocks is None:
            # No MLA layer (an all-KDA model): blocks hold nothing, so give every sequence room for the full
            # context and spend the whole budget on state slots.
            model_len = cfg.max_model_len or model.max_model_len
            cfg.num_kv_blocks = cfg.max_num_seqs * -(-model_len // cfg.block_size)
            if cfg.num_state_slots is None:
                budget = self._cache_budget() if self.device.type == "cuda" else cfg.cpu_cache_bytes
                cfg.num_state_slots = int(budget // slot_bytes)
        if cfg.num_state_slots is None or cfg.num_kv_blocks is None:
            budget = self._cache_budget() if self.device.type == "cuda" else cfg.cpu_cache_bytes
            if cfg.num_state_slots is None and cfg.num_kv_blocks is None:
                state_budget = budget * cfg.state_memory_fraction
            elif cfg.num_state_slots is None:
                state_budget = budget - cfg.num_kv_blocks * block_bytes
            else:
                state_budget = cfg.num_state_slots * slot_bytes
            if cfg.num_state_slots is None:
                cfg.num_state_slots = int(state_budget // slot_bytes)
            if cfg.num_kv_blocks is None:
                cfg.num_kv_blocks = int((budget - cfg.num_state_slots * slot_bytes) // block_bytes)
            if cfg.num_state_slots < 1 or cfg.num_kv_blocks < 1:
                raise ValueError(
                    f"EngineConfig: a cache budget of {budget / 2**20:.1f} MiB holds {cfg.num_state_slots} state slots "
                    f"({slot_bytes / 2**20:.2f} MiB each) and {cfg.num_kv_blocks} KV blocks "
                    f"({block_bytes / 2**20:.3f} MiB each); raise the budget or set the counts"
                )
        model_len = cfg.max_model_len or model.max_model_len
        cfg.max_model_len = min(model_len, cfg.num_kv_blocks * cfg.block_size)
        log.info(
            "caches: %d state slots (%.1f MiB), %d KV blocks of %d tokens (%.1f MiB), max_model_len %d",
            cfg.num_state_slots, cfg.num_state_slots * slot_bytes / 2**20, cfg.num_kv_blocks, cfg.block_size,
            cfg.num_kv_blocks * block_bytes / 2**20, cfg.max_model_len,
        )

    def _cache_budget(self) -> int:
        """Free CUDA memory for caches: the utilisation cap minus memory in use minus the activation peak."""
        cfg = self.config
        tokens = min(cfg.max_num_batched_tokens, cfg.max_model_len or self.model.max_model_len)
        blocks = -(-tokens // cfg.block_size)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        caches = self.model.allocate_caches(1, blocks, cfg.block_size, self.state_dtype)
        self.model.forward(profile_batch(tokens, cfg.block_size).to(self.device), caches)
        torch.cuda.synchronize(self.device)
        activation = torch.cuda.max_memory_allocated(self.device) - base
        if self.model.config.mla_layers:
            # the MLA attention of a step with cached context holds up to EXPANDED_BUDGET elements of expanded
            # keys and values per call (model/mla_prefill.py), which a prefill from scratch may not reach
            activation += EXPANDED_BUDGET * self.model.dtype.itemsize
        del caches
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        budget = int(total * cfg.gpu_memory_utilization - (total - free) - activation)
        log.info("profiling: activation peak %.2f GiB, cache budget %.2f GiB", activation / 2**30, budget / 2**30)
        return max(budget, 0)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, batch: RaggedBatch, pending_inputs=None) -> torch.Tensor:
        """Restores cached prefixes, runs the step, saves states for the prefix cache; logits [N, vocab] fp32.

        pending_inputs: None, or (rows, sources, tokens): input_ids[rows[i]] is tokens[sources[i]], a token
        the previous step sampled that is still only on the device (asynchronous scheduling)."""
        if out.state_restores:
            src, dst = zip(*out.state_restores)
            self.caches.copy_states(list(src), list(dst))
        if out.block_copies:
            self._copy_kv_blocks(*zip(*out.block_copies))
        patch = None
        if pending_inputs is not None:
            rows, sources, tokens = pending_inputs
            patch = (host_to_device(rows, self.device, torch.long),
                     tokens.index_select(0, host_to_device(sources, self.device, torch.long)))
        if self.graphs is not None and self.graphs.step_width(batch) is not None:
            logits = self.graphs.run(batch, patch)
        else:
            # Checked once here, on the host: the ops then skip their own index checks, each of which would
            # wait for the GPU (docs/engine.md, "Host synchronisation").
            batch.check(self.config.num_state_slots, self.num_kv_blocks, self.config.block_size)
            device_batch = batch.to(self.device)
            with indices_checked_by_caller():
                if self.prompt_graphs is not None and batch.num_tokens <= self.prompt_graphs.max_tokens:
                    logits = self.prompt_graphs.run(batch, device_batch, patch)
                else:
                    if patch is not None:
                        device_batch.input_ids.index_copy_(0, *patch)
                    logits = self.model.forward(device_batch, self.caches)
        if out.state_saves:
            src, dst = zip(*out.state_saves)
            self.caches.copy_states(list(src), list(dst))
        return logits

    def _copy_kv_blocks(self, src, dst) -> None:
        """Copy-on-write of partly filled shared KV blocks, in every MLA layer."""
        src_t = host_to_device(src, self.device, torch.long)
        dst_t = host_to_device(dst, self.device, torch.long)
        for kv in self.caches.kv:
            kv.index_copy_(0, dst_t, kv.index_select(0, src_t))


def profile_batch(tokens: int, block_size: int) -> RaggedBatch:
    """A prefill of one sequence of `tokens` tokens from scratch in slot 0, blocks 0.., for memory profiling."""
    blocks = -(-tokens // block_size)
    zeros = torch.zeros(1, dtype=torch.int32)
    return RaggedBatch(
        input_ids=torch.zeros(tokens, dtype=torch.int64),
        positions=torch.arange(tokens, dtype=torch.int64),
        cu_seqlens=torch.tensor([0, tokens], dtype=torch.int32),
        context_lens=zeros,
        seq_lens=torch.tensor([tokens], dtype=torch.int32),
        state_slots=zeros,
        has_initial_state=torch.zeros(1, dtype=torch.bool),
        block_tables=torch.arange(blocks, dtype=torch.int32)[None],
        slot_mapping=torch.arange(tokens, dtype=torch.int64),
        logits_indices=torch.tensor([tokens - 1], dtype=torch.int64),
        query_lens=[tokens],
        kv_lens=[tokens],
    )
