"""The model on an SM90 GPU (bf16, our CUDA KDA/conv kernels) against the fp32 CPU model on the same weights.

Tolerance, FA3 style: the GPU's error against the fp32 truth must be within a small multiple of the error of a
bf16 run of the *same* code on the CPU (bf16 activations, fp32 states, the chunked CPU KDA op). That run
measures what bf16 rounding alone costs on these weights: bf16 keeps 8 significant bits (unit roundoff
2^-9 ~ 2e-3), every projection, norm and residual add rounds, and through 4 layers the logits end up 1-3e-2
off in relative norm (measured on the CPU: dense model 3.1e-2, default model median per token 1.5e-2).
The kernels may round in a different order, not more: error <= 2x the CPU-bf16 error + 2e-3.

MoE models add a discontinuity: a token whose k-th and (k+1)-th expert scores are closer than the bf16 noise
switches experts, and its logits move by O(1) (5.8% of the default model's tokens on the CPU in bf16). Which
tokens switch differs between two bf16 implementations, so for MoE models the bound is on the *median*
per-token error and on the *fraction* of switched tokens (error > 0.1; at most 5 points more than the CPU's).
Greedy agreement is checked teacher-forced (every step is fed the fp32 model's greedy token, so one flip
cannot cascade): at least 90% of argmaxes agree and, for the dense model, all of them where the fp32
top-1/top-2 gap exceeds 3x the largest CPU-bf16 logit error.
"""

from __future__ import annotations

import os

import pytest
import torch
from kimi_testing import Sequence, make_hf_model, run_step, save_hf_checkpoint

from kda_serving.model import default_model_path, load_model

pytestmark = pytest.mark.gpu
BLOCK = 16


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module", params=["default-moe", "random-dense-qlora"])
def checkpoint(request, tmp_path_factory):
    """(checkpoint dir, has MoE). The dense one is continuous in its inputs, so it gets the strict bounds."""
    if request.param == "default-moe":
        os.environ.setdefault("KDA_SERVING_CACHE", str(tmp_path_factory.mktemp("cache")))
        return default_model_path(), True
    hf, _ = make_hf_model(
        seed=12, hidden_size=256, q_lora_rank=64, first_k_dense_replace=4,
        linear_attn_config={"kda_layers": [1, 2, 4], "full_attn_layers": [3], "num_heads": 2, "head_dim": 128,
                            "short_conv_kernel_size": 4},
    )
    return save_hf_checkpoint(hf, str(tmp_path_factory.mktemp("random"))), False


def _serve(model, prompts: list[list[int]], forced: list[list[int]]) -> list[torch.Tensor]:
    """Packed prefill (the longest prompt chunked across two steps, the others joining late), then decode steps
    feeding `forced` tokens; returns each request's logits for every position it ran, [len, vocab]."""
    caches = model.allocate_caches(8, 96, BLOCK)
    seqs = [Sequence(p + f, slot=2 * i + 1, blocks=list(range(24 * i, 24 * i + 24)))
            for i, (p, f) in enumerate(zip(prompts, forced))]
    long, *rest = seqs
    half = len(prompts[0]) // 2
    run_step(model, caches, [(long, half)], BLOCK)
    run_step(model, caches, [(s, len(p)) for s, p in zip(rest, prompts[1:])] + [(long, len(prompts[0]) - half)],
             BLOCK)
    for _ in range(len(forced[0])):
        run_step(model, caches, [(s, 1) for s in seqs], BLOCK)
    return [torch.cat(s.logits) for s in seqs]


def test_bf16_gpu_matches_fp32_cpu(checkpoint):
    path, moe = checkpoint
    cpu = load_model(path, device="cpu", dtype=torch.float32, progress=False)
    vocab = cpu.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (300, 37, 1, 130)]
    # greedy continuation of the fp32 model, then used to force every run (teacher forcing)
    steps = 12
    ref = _serve(cpu, prompts, [[0] * steps for _ in prompts])
    forced = [[int(t) for t in r[len(p) - 1:-1].argmax(-1)] for r, p in zip(ref, prompts)]
    ref = torch.cat(_serve(cpu, prompts, forced))
    cpu_bf16 = torch.cat(_serve(load_model(path, device="cpu", dtype=torch.bfloat16, progress=False), prompts,
                                forced))
    gpu = torch.cat(_serve(load_model(path, device="cuda", progress=False), prompts, forced))
    assert torch.isfinite(gpu).all()

    def per_token(x):
        return (x.double() - ref.double()).norm(dim=-1) / ref.double().norm(dim=-1)

    tok_cpu, tok_gpu = per_token(cpu_bf16), per_token(gpu)
    agree_cpu = (cpu_bf16.argmax(-1) == ref.argmax(-1)).float().mean().item()
    agree = gpu.argmax(-1) == ref.argmax(-1)
    print(f"{path}: relative error gpu {_rel(gpu, ref):.2e} (cpu-bf16 {_rel(cpu_bf16, ref):.2e}); median per token "
          f"gpu {tok_gpu.median():.2e} (cpu-bf16 {tok_cpu.median():.2e}); switched tokens gpu "
          f"{(tok_gpu > 0.1).float().mean():.3f} (cpu-bf16 {(tok_cpu > 0.1).float().mean():.3f}); greedy "
          f"agreement gpu {agree.float().mean():.3f} (cpu-bf16 {agree_cpu:.3f}) over {agree.numel()} positions")
    assert tok_gpu.median() <= 2 * tok_cpu.median() + 2e-3
    assert agree.float().mean() >= 0.9
    if moe:
        assert (tok_gpu > 0.1).float().mean() <= (tok_cpu > 0.1).float().mean() + 0.05
        return
    assert _rel(gpu, ref) <= 2 * _rel(cpu_bf16, ref) + 2e-3
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 3 * (cpu_bf16 - ref).abs().max()
    assert agree[clear].all(), f"{int((~agree[clear]).sum())} clear greedy choices differ"


def test_48b_layer_shapes_chunked_equals_one_shot():
    """The published layer shapes (KDA 32x128 heads, MLA latent 512+64 with 32 heads, 256 experts) on the GPU:
    a prompt run in chunks and then decoded token by token gives the logits of the same tokens run in one
    prefill, within bf16 noise (the two paths round differently: chunk boundaries, decode kernels)."""
    from kda_serving.model.random_model import random_model

    path = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "kimi-linear-48b-4layer.json")
    model = random_model(path, device="cuda", seed=0)
    tokens = torch.randint(0, model.config.vocab_size, (420,), generator=torch.Generator().manual_seed(1)).tolist()
    caches = model.allocate_caches(4, 64, BLOCK)
    one = Sequence(tokens, slot=0, blocks=list(range(0, 32)))
    run_step(model, caches, [(one, 420)], BLOCK)
    steps = Sequence(tokens, slot=1, blocks=list(range(32, 64)))
    run_step(model, caches, [(steps, 250)], BLOCK)
    run_step(model, caches, [(steps, 160)], BLOCK)
    for _ in range(10):
        run_step(model, caches, [(steps, 1)], BLOCK)
    a, b = one.logits[0], torch.cat(steps.logits)
    assert torch.isfinite(b).all()
    tok = (b.double() - a.double()).norm(dim=-1) / a.double().norm(dim=-1)
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    print(f"48B shapes: chunked+decode vs one-shot: median per-token {tok.median():.2e}, max {tok.max():.2e}, "
          f"argmax agreement {agree:.3f}")
    # Random N(0, 0.02) weights give nearly flat logits (top-2 gaps of the order of bf16 noise; 0.91 agreement
    # in a CPU bf16 run), so the argmax bound is loose; the median per-token error (1.6e-2 on the CPU) is the check.
    assert tok.median() < 3e-2 and agree >= 0.8
