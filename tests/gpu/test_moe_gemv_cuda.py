"""The small-batch MoE kernel (ops.moe_experts_gemv, csrc/moe/moe_gemv.cu) on a GPU against float64, at
Kimi-Linear-48B's expert shapes (hidden 2304, experts of 1024, top 8; 32 experts to keep the weights small),
with bf16 and e4m3 experts.

Bound: the kernel multiplies in fp32 and rounds once, to the bf16 output (unit roundoff 2^-9, ~2e-3 in relative
norm), so 5e-3 fails a wrong expert, row, scale or routing weight by orders of magnitude; the e4m3 experts are
compared with their own dequantized weights (what they are), unquantized activations (the kernel's W8A16).
Outputs are poisoned with NaN before each call, so an element the kernel skipped fails.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kda_serving.model import moe as moe_module
from kda_serving.model.fp8 import dequantize_rows, quantize_rows
from kda_serving.ops import cuda_moe, moe_experts_gemv

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

E, HIDDEN, INTER, TOP_K = 32, 2304, 1024, 8
TOL = 5e-3


@pytest.fixture(scope="module")
def experts():
    gen = torch.Generator(device="cuda").manual_seed(0)
    gate_up = (torch.randn(E, 2 * INTER, HIDDEN, generator=gen, device="cuda") * HIDDEN**-0.5).to(torch.bfloat16)
    down = (torch.randn(E, HIDDEN, INTER, generator=gen, device="cuda") * INTER**-0.5).to(torch.bfloat16)
    q1, s1 = quantize_rows(gate_up)
    q2, s2 = quantize_rows(down)
    return {"bf16": (gate_up, down, None, None), "fp8": (q1, q2, s1, s2)}


def _routed(T: int, seed: int, repeat: bool = False):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(T, HIDDEN, generator=gen, device="cuda").to(torch.bfloat16)
    ids = torch.rand(T, E, generator=gen, device="cuda").topk(TOP_K, dim=-1).indices
    if repeat:  # every token the same experts: pairs sharing an expert
        ids = ids[:1].expand(T, -1).contiguous()
    weights = torch.rand(T, TOP_K, generator=gen, device="cuda") * 2.4
    return x, ids, weights


def _float64(x, ids, weights, gate_up, down, s1, s2) -> torch.Tensor:
    """Written here: per token, per chosen expert in order, SwiGLU in float64 on the (dequantized) weights."""
    w1 = (gate_up.double() if s1 is None else dequantize_rows(gate_up, s1).double()).cpu()
    w2 = (down.double() if s2 is None else dequantize_rows(down, s2).double()).cpu()
    xd, ids_c, wd = x.double().cpu(), ids.cpu(), weights.double().cpu()
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids_c[t, j])
            g, u = (w1[e] @ xd[t]).chunk(2)
            out[t] += wd[t, j] * (w2[e] @ (F.silu(g) * u))
    return out


def _call(x, ids, weights, gate_up, down, s1, s2) -> torch.Tensor:
    """The op with its output poisoned first."""
    out = torch.full(x.shape, float("nan"), dtype=x.dtype, device=x.device)
    torch.ops.kda_serving.moe_experts_gemv_(x, ids, weights, gate_up, s1, down, s2, None, None, None, out)
    return out


@pytest.mark.parametrize("kind", ["bf16", "fp8"])
@pytest.mark.parametrize("T,repeat", [(1, False), (3, False), (16, False), (5, True)])
def test_moe_gemv_matches_float64(experts, kind, T, repeat):
    gate_up, down, s1, s2 = experts[kind]
    assert cuda_moe.supports(torch.empty(T, HIDDEN, device="cuda", dtype=torch.bfloat16), gate_up, TOP_K)
    x, ids, weights = _routed(T, seed=T, repeat=repeat)
    out = _call(x, ids, weights, gate_up, down, s1, s2)
    ref = _float64(x, ids, weights, gate_up, down, s1, s2)
    assert not torch.isnan(out).any(), "an output element was not written"
    diff = out.double().cpu() - ref
    rel = (diff.norm() / ref.norm()).item()
    print(f"{kind} T={T} repeat={repeat}: rel {rel:.2e}, max abs {diff.abs().max().item():.2e}")
    assert rel <= TOL
    again = _call(x, ids, weights, gate_up, down, s1, s2)
    assert torch.equal(out, again)  # fixed summation order


@pytest.mark.parametrize("kind", ["bf16", "fp8"])
@pytest.mark.parametrize("top_k", [3, 6])
def test_moe_gemv_other_shapes_match_float64(kind, top_k):
    """Rows wider than one batch of loads (hidden 4,096: two batches of gate/up loads per lane), a narrow
    intermediate (256: one load per lane and down row), and a top_k the down kernel's groups of experts do not
    divide (3, 6: groups of 8 for e4m3 and 4 for bf16, the rest empty)."""
    E_, H_, I_, T = 8, 4096, 256, 4
    gen = torch.Generator(device="cuda").manual_seed(top_k)
    gate_up = (torch.randn(E_, 2 * I_, H_, generator=gen, device="cuda") * H_**-0.5).to(torch.bfloat16)
    down = (torch.randn(E_, H_, I_, generator=gen, device="cuda") * I_**-0.5).to(torch.bfloat16)
    s1 = s2 = None
    if kind == "fp8":
        (gate_up, s1), (down, s2) = quantize_rows(gate_up), quantize_rows(down)
    x = torch.randn(T, H_, generator=gen, device="cuda").to(torch.bfloat16)
    ids = torch.rand(T, E_, generator=gen, device="cuda").topk(top_k, dim=-1).indices
    weights = torch.rand(T, top_k, generator=gen, device="cuda") * 2.4
    assert cuda_moe.supports(x, gate_up, top_k)
    out = _call(x, ids, weights, gate_up, down, s1, s2)
    ref = _float64(x, ids, weights, gate_up, down, s1, s2)
    assert not torch.isnan(out).any(), "an output element was not written"
    rel = ((out.double().cpu() - ref).norm() / ref.norm()).item()
    print(f"{kind} hidden {H_} inter {I_} top_k {top_k}: rel {rel:.2e}")
    assert rel <= TOL


def _shared(parts: int, seed: int):
    """bf16 shared experts of width parts * INTER: gate_up [2S, HIDDEN] ([gate; up]) and down [HIDDEN, S]."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    S = parts * INTER
    gate_up = (torch.randn(2 * S, HIDDEN, generator=gen, device="cuda") * HIDDEN**-0.5).to(torch.bfloat16)
    down = (torch.randn(HIDDEN, S, generator=gen, device="cuda") * S**-0.5).to(torch.bfloat16)
    return gate_up, down


@pytest.mark.parametrize("kind", ["bf16", "fp8"])
@pytest.mark.parametrize("T,parts,with_residual", [(1, 1, False), (1, 1, True), (5, 1, True), (12, 1, False),
                                                  (3, 2, True)])
def test_shared_experts_ride_along_match_float64(experts, kind, T, parts, with_residual):
    """The shared experts as P more pairs per token (P = 1: Kimi-Linear's one shared expert; 2: a width of two
    experts, its gate and up rows split in parts), and the decoder's residual added in the epilogue: the whole
    MoE layer after routing, with its residual add, against float64."""
    gate_up, down, s1, s2 = experts[kind]
    sg, sd = _shared(parts, seed=40 + T)
    x, ids, weights = _routed(T, seed=30 + T)
    residual = (torch.randn_like(x, dtype=torch.float32) * 3).to(torch.bfloat16) if with_residual else None
    assert cuda_moe.supports(x, gate_up, TOP_K, parts) and cuda_moe.shared_parts(gate_up, sg) == parts
    out = torch.full(x.shape, float("nan"), dtype=x.dtype, device=x.device)
    torch.ops.kda_serving.moe_experts_gemv_(x, ids, weights, gate_up, s1, down, s2, sg, sd, residual, out)
    ref = _float64(x, ids, weights, gate_up, down, s1, s2)
    g, u = (x.double().cpu() @ sg.double().cpu().T).chunk(2, dim=-1)
    shared_ref = (F.silu(g) * u) @ sd.double().cpu().T
    ref += shared_ref
    if with_residual:
        ref += residual.double().cpu()
    assert not torch.isnan(out).any(), "an output element was not written"
    diff = out.double().cpu() - ref
    rel = (diff.norm() / ref.norm()).item()
    print(f"{kind} T={T} shared parts {parts}: rel {rel:.2e}, max abs {diff.abs().max().item():.2e}, shared part "
          f"of the norm {(shared_ref.norm() / ref.norm()).item():.2f}")
    assert rel <= TOL
    again = torch.empty_like(out)
    torch.ops.kda_serving.moe_experts_gemv_(x, ids, weights, gate_up, s1, down, s2, sg, sd, residual, again)
    assert torch.equal(out, again)  # fixed summation order


def test_out_of_range_experts_contribute_nothing(experts):
    gate_up, down, _, _ = experts["bf16"]
    x, ids, weights = _routed(2, seed=7)
    bad = ids.clone()
    bad[0, 3], bad[1, 0] = E, -1
    kept = weights.clone()
    kept[0, 3] = kept[1, 0] = 0  # the same as routing those pairs with weight 0
    out = _call(x, bad, weights, gate_up, down, None, None)
    ref = _float64(x, ids, kept, gate_up, down, None, None)
    assert ((out.double().cpu() - ref).norm() / ref.norm()).item() <= TOL


@pytest.mark.parametrize("with_shared", [False, True])
def test_moe_gemv_captures_in_a_cuda_graph(experts, with_shared):
    gate_up, down, s1, s2 = experts["fp8"]
    sg, sd = _shared(1, seed=9) if with_shared else (None, None)
    x, ids, weights = _routed(4, seed=11)

    def call():
        return moe_experts_gemv(x, ids, weights, gate_up, down, s1, s2, shared_gate_up=sg, shared_down=sd)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = call()
    for seed in range(3):
        nx, nids, nw = _routed(4, seed=20 + seed)
        for static_in, new in ((x, nx), (ids, nids), (weights, nw)):
            static_in.copy_(new)
        graph.replay()
        assert torch.equal(static, call())


def test_bad_arguments_are_named(experts):
    gate_up, down, s1, s2 = experts["fp8"]
    x, ids, weights = _routed(2, seed=3)
    with pytest.raises(ValueError, match="ids"):
        moe_experts_gemv(x, ids.int(), weights, gate_up, down, s1, s2)
    with pytest.raises(ValueError, match="gate_up_scale"):
        moe_experts_gemv(x, ids, weights, gate_up, down)
    with pytest.raises(ValueError, match="weights"):
        moe_experts_gemv(x, ids, weights.double(), gate_up, down, s1, s2)
    with pytest.raises(TypeError, match="x"):
        cuda_moe.moe_gemv(x.float(), ids, weights, gate_up, s1, down, s2, None, None,
                          torch.empty(16, INTER, device="cuda"), None, torch.empty_like(x))
    sg, sd = _shared(1, seed=1)
    with pytest.raises(ValueError, match="shared_gate_up"):  # a width that is no multiple of the experts'
        narrow_gate_up, narrow_down = sg[INTER // 2:-INTER // 2], sd[:, :INTER // 2].contiguous()
        cuda_moe.moe_gemv(x, ids, weights, gate_up, s1, down, s2, narrow_gate_up, narrow_down,
                          torch.empty(2 * (TOP_K + 1), INTER, device="cuda"), None, torch.empty_like(x))
    with pytest.raises(ValueError, match="'h'"):  # the workspace must hold the shared pairs too
        cuda_moe.moe_gemv(x, ids, weights, gate_up, s1, down, s2, sg, sd, torch.empty(2 * TOP_K, INTER,
                          device="cuda"), None, torch.empty_like(x))


def _moe_layer(experts, shared=None) -> moe_module.MoE:
    """A bf16 MoE layer on the fixture's experts, a random router, and the given shared expert (gate_up, down)."""
    from kda_serving.model.config import ModelConfig

    cfg = ModelConfig.from_dict({
        "model_type": "kimi_linear", "vocab_size": 64, "hidden_size": HIDDEN, "intermediate_size": 256,
        "moe_intermediate_size": INTER, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
        "num_experts": E, "num_experts_per_token": TOP_K, "num_shared_experts": 0 if shared is None else 1,
        "first_k_dense_replace": 1, "kv_lora_rank": 64, "qk_rope_head_dim": 16, "qk_nope_head_dim": 32,
        "v_head_dim": 32, "linear_attn_config": {"kda_layers": [1], "full_attn_layers": [2], "num_heads": 2,
                                                 "head_dim": 128, "short_conv_kernel_size": 4}})
    layer = moe_module.MoE(cfg, torch.bfloat16, "cuda")
    with torch.no_grad():
        layer.gate_up_proj.copy_(experts["bf16"][0])
        layer.down_proj.copy_(experts["bf16"][1])
        layer.router.copy_(torch.randn(E, HIDDEN, device="cuda") * 0.1)
        layer.e_score_correction_bias.zero_()
        if shared is not None:
            layer.shared_experts.gate_up_proj.copy_(shared[0])
            layer.shared_experts.down_proj.copy_(shared[1])
    return layer


def test_moe_layer_takes_the_gemv_path_up_to_its_limit(experts, monkeypatch):
    """MoE._experts sends steps of up to GEMV_MAX_TOKENS tokens to the kernel and larger ones to the grouped
    GEMMs: both agree within the bf16 rounding of the grouped path's intermediate activation."""
    layer = _moe_layer(experts)
    calls = []
    real = moe_module.moe_experts_gemv
    monkeypatch.setattr(moe_module, "moe_experts_gemv",
                        lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))
    x = torch.randn(moe_module.GEMV_MAX_TOKENS, HIDDEN, device="cuda").to(torch.bfloat16)
    ids, weights = layer.route(x)
    gemv = layer._experts(x, ids, weights)
    layer._experts(torch.cat([x, x[:1]]), *layer.route(torch.cat([x, x[:1]])))
    assert calls == [moe_module.GEMV_MAX_TOKENS]  # the step one token over went to the grouped GEMMs
    monkeypatch.setattr(moe_module, "GEMV_MAX_TOKENS", 0)
    grouped = layer._experts(x, ids, weights)
    rel = ((gemv.double() - grouped.double()).norm() / grouped.double().norm()).item()
    assert rel <= TOL, rel


def test_moe_layer_fuses_its_shared_expert_into_the_gemv(experts, monkeypatch):
    """A layer with a shared expert hands it to the kernel on the GEMV path (one call, the shared weights in it),
    and agrees with the unfused layer (kernel for the routed experts, then the DenseMLP added in bf16)."""
    layer = _moe_layer(experts, shared=_shared(1, seed=5))
    calls = []
    real = moe_module.moe_experts_gemv
    monkeypatch.setattr(moe_module, "moe_experts_gemv",
                        lambda *a, **kw: calls.append(kw.get("shared_gate_up") is not None) or real(*a, **kw))
    x = torch.randn(3, HIDDEN, device="cuda").to(torch.bfloat16)
    h = torch.randn(3, HIDDEN, device="cuda").to(torch.bfloat16)  # the decoder's residual stream
    fused = layer(x)
    fused_add = layer(x, residual=h)
    monkeypatch.setattr(moe_module.MoE, "fuse_shared_experts", False)
    unfused = layer(x)
    unfused_add = layer(x, residual=h)
    assert calls == [True, True, False, False]
    for a, b in ((fused, unfused), (fused_add, unfused_add)):
        rel = ((a.double() - b.double()).norm() / b.double().norm()).item()
        assert rel <= TOL, rel
