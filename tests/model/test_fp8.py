"""FP8 experts (model/fp8.py) on the CPU: the row quantization's error bound, the loop path's arithmetic
against float64, loading quantized from both checkpoint namings, random weights, and the engine's setting.
The GPU path (torch._scaled_grouped_mm) is checked against float64 in tests/gpu/test_moe_cuda.py, and the whole
engine against fp32 transformers in tests/engine/test_engine_bf16.py."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from kimi_testing import make_hf_model, save_hf_checkpoint, save_moonshot_checkpoint, tiny_hf_config

from kda_serving.engine import EngineConfig
from kda_serving.model import ModelConfig, fp8, load_model, weight_bytes
from kda_serving.model.fp8 import FP8, dequantize_rows, fp8_linear, quantize_into_, quantize_rows
from kda_serving.model.moe import MoE
from kda_serving.model.random_init import fill_random_
from kda_serving.server.cli import build_parser


def _rows(seed: int) -> torch.Tensor:
    """Rows over many magnitudes: N(0, 1) times 10^U(-6, 6) per row, a row of zeros, a row of one spike, rows
    with elements in e4m3's subnormal range relative to their amax."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 300, generator=gen, dtype=torch.float64)
    x *= 10.0 ** torch.empty(64, 1, dtype=torch.float64).uniform_(-6, 6, generator=gen)
    x[3] = 0
    x[4] = 0
    x[4, 17] = -3e4
    x[5, :10] *= 1e-4  # far below the row's amax: subnormal after scaling
    return x


def test_quantize_rows_error_bound_and_amax():
    x = _rows(0)
    q, scale = quantize_rows(x)
    assert q.dtype == FP8 and scale.dtype == torch.float32 and scale.shape == (64,)
    back = dequantize_rows(q, scale).double()
    assert torch.isfinite(back).all()
    s = scale.double()[:, None]
    # rounding to nearest e4m3: 2^-4 relative for normals, 2^-10 of the scale for subnormals (2^-6 scale and
    # below); 1e-6 relative slack for the fp32 division
    bound = torch.maximum(x.abs() * 2.0**-4, s * 2.0**-10) * (1 + 1e-6) + x.abs() * 1e-6
    excess = (back - x).abs() - bound
    assert excess.max() <= 0, f"largest excess over the bound {excess.max().item():.3e}"
    # each nonzero row's amax maps to +-448 exactly; the zero row to zeros with a positive scale
    nonzero = x.abs().amax(1) > 0
    assert torch.all(q.float().abs().amax(1)[nonzero] == fp8.FP8_MAX)
    assert torch.all(q[3].float() == 0) and scale[3] > 0
    assert (back[4] == x[4]).all()  # the spike is its own amax: exact; the zeros stay zeros
    # a per-tensor scale would fail the bound on the small rows (they would round to zero)
    assert ((x / x.abs().max() * 448).to(FP8).double() * x.abs().max() / 448 - x).abs().max() > 0


def test_quantize_into_slices_equal_one_call(monkeypatch):
    x = _rows(1).float()
    q_all, s_all = quantize_rows(x)
    monkeypatch.setattr(fp8, "QUANTIZE_ROWS_PER_CALL", 7)  # 64 rows in 10 calls, the last short
    q, s = torch.empty(64, 300, dtype=FP8), torch.empty(64)
    quantize_into_(q, s, x)
    assert torch.equal(q.view(torch.uint8), q_all.view(torch.uint8)) and torch.equal(s, s_all)
    with pytest.raises(ValueError, match="do not match"):
        quantize_into_(q, torch.empty(63), x)


def test_fp8_linear_is_the_float64_product_of_quantized_operands():
    gen = torch.Generator().manual_seed(2)
    x, w = torch.randn(9, 256, generator=gen), torch.randn(48, 256, generator=gen) * 0.05
    wq, ws = quantize_rows(w)
    xq, xs = quantize_rows(x)
    ref = (xq.double() * xs.double()[:, None]) @ (wq.double() * ws.double()[:, None]).T
    out = fp8_linear(x, wq, ws)
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    assert out.dtype == x.dtype and rel < 1e-6, rel  # fp32 accumulation only
    unquantized = x.double() @ w.double().T
    q_err = ((out.double() - unquantized).norm() / unquantized.norm()).item()
    assert 5e-3 < q_err < 6e-2, q_err  # e4m3 on both operands: a few percent, not zero


def _moe_config() -> ModelConfig:
    return ModelConfig.from_dict(tiny_hf_config().to_dict())


def _moe_pair(seed: int) -> tuple[MoE, MoE]:
    """A float32 MoE with random weights, and its copy with fp8 experts."""
    moe = fill_random_(MoE(_moe_config(), torch.float32, "cpu"), seed)
    quantized = copy.deepcopy(moe)
    quantized.quantize_experts_()
    return moe, quantized


def test_fp8_experts_loop_matches_float64_emulation():
    moe, q = _moe_pair(seed=3)
    assert q.fp8 and q.gate_up_proj.dtype == FP8 and q.down_proj_scale.shape == q.down_proj.shape[:2]
    x = torch.randn(11, moe.gate_up_proj.shape[2], generator=torch.Generator().manual_seed(4))
    ids, weights = q.route(x)
    got = q._experts(x, ids, weights).double()
    # float64 emulation written here: per (token, expert) pair, each GEMM's input row quantized, both
    # operands dequantized, the SwiGLU between
    ref = torch.zeros_like(got)

    def deq(t, s):
        return t.double() * s.double()[..., None]

    def quant(row):
        qr, sr = quantize_rows(row.float())
        return deq(qr, sr)

    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            g, u = (deq(q.gate_up_proj[e], q.gate_up_proj_scale[e]) @ quant(x[t])).chunk(2)
            h = F.silu(g) * u
            ref[t] += float(weights[t, j]) * (deq(q.down_proj[e], q.down_proj_scale[e]) @ quant(h))
    rel = ((got - ref).norm() / ref.norm()).item()
    unquantized = moe._experts(x, ids, weights).double()
    q_err = ((got - unquantized).norm() / unquantized.norm()).item()
    print(f"fp8 loop vs float64 emulation {rel:.2e}; vs unquantized experts {q_err:.2e}")
    assert rel < 1e-5, rel
    assert 5e-3 < q_err < 0.1, q_err


@pytest.mark.parametrize("naming", ["hf", "moonshot"])
def test_load_quantized_equals_quantizing_the_loaded_model(naming, tmp_path):
    hf, cfg = make_hf_model(seed=6)
    path = str(tmp_path / naming)
    (save_hf_checkpoint(hf, path) if naming == "hf" else save_moonshot_checkpoint(hf, cfg, path))
    direct = load_model(path, progress=False, quantization="fp8")
    after = load_model(path, progress=False).quantize_experts_()
    assert direct.quantization == after.quantization == "fp8"
    a, b = dict(direct.named_parameters()), dict(after.named_parameters())
    assert a.keys() == b.keys() and any(p.dtype == FP8 for p in a.values())
    for name, p in a.items():
        if p.dtype == FP8:
            assert torch.equal(p.view(torch.uint8), b[name].view(torch.uint8)), name
        else:
            assert torch.equal(p, b[name]), name
    with pytest.raises(ValueError, match="quantization"):
        load_model(path, progress=False, quantization="int4")


def test_random_fp8_experts_have_the_requested_spread():
    fresh = fill_random_(MoE(_moe_config(), torch.float32, "cpu", fp8=True), seed=8, weight_std=0.02)
    w = dequantize_rows(fresh.gate_up_proj, fresh.gate_up_proj_scale)
    assert torch.isfinite(w).all() and abs(w.std().item() - 0.02) < 2e-3
    assert torch.all(fresh.down_proj_scale > 0)


def test_engine_and_cli_take_the_setting():
    assert EngineConfig(quantization="fp8").quantization == "fp8"
    with pytest.raises(ValueError, match="quantization"):
        EngineConfig(quantization="fp4")
    assert build_parser().parse_args(["--quantization", "fp8"]).quantization == "fp8"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--quantization", "int8"])
    args = build_parser().parse_args(["--quantization", "fp8", "--fp8-fast-accumulation"])
    assert args.fp8_fast_accumulation is True and build_parser().parse_args([]).fp8_fast_accumulation is None
    assert EngineConfig(quantization="fp8", fp8_fast_accumulation=True).fp8_fast_accumulation
    with pytest.raises(ValueError, match="needs quantization='fp8'"):
        EngineConfig(fp8_fast_accumulation=True)
    with pytest.raises(TypeError, match="must be a bool"):
        EngineConfig(quantization="fp8", fp8_fast_accumulation="yes")


def test_fast_accumulation_reaches_every_moe_layer(tmp_path):
    from kda_serving.engine import LLM

    hf, _ = make_hf_model(seed=9)
    path = save_hf_checkpoint(hf, str(tmp_path / "ckpt"))
    with pytest.raises(ValueError, match="needs fp8 experts"):
        load_model(path, progress=False).set_fp8_fast_accumulation(True)
    model = load_model(path, progress=False, quantization="fp8")
    moes = [layer.mlp for layer in model.layers if isinstance(layer.mlp, MoE)]
    assert moes and not any(m.fast_accumulation for m in moes)  # off by default
    LLM(model_obj=model, device="cpu", quantization="fp8", fp8_fast_accumulation=True, num_state_slots=4,
        num_kv_blocks=16)
    assert all(m.fast_accumulation for m in moes)
    model.set_fp8_fast_accumulation(False)
    assert not any(m.fast_accumulation for m in moes)


def test_load_model_refuses_weights_over_free_gpu_memory(tmp_path, monkeypatch):
    """On CUDA the weights' size is checked against the free memory before anything is allocated, with the fp8
    experts' size as the way out where it fits (checked here on the CPU: no allocation happens before it)."""
    k128 = {"kda_layers": [1, 2, 3], "full_attn_layers": [4], "num_heads": 2, "head_dim": 128,
            "short_conv_kernel_size": 4}
    hf, _ = make_hf_model(seed=1, hidden_size=128, linear_attn_config=k128)
    path = save_hf_checkpoint(hf, str(tmp_path / "k128"))
    cfg = ModelConfig.from_file(path)
    need_bf16, need_fp8 = weight_bytes(cfg, torch.bfloat16), weight_bytes(cfg, torch.bfloat16, "fp8")
    loaded = load_model(path, dtype="bfloat16", quantization="fp8", progress=False)
    assert need_fp8 == sum(p.numel() * p.element_size() for p in loaded.parameters()) < need_bf16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for free, match in (((need_bf16 + need_fp8) // 2, r"with fp8 experts \(quantization='fp8'.* take"),
                        (need_fp8 // 2, "still too many")):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, free=free: (free, 4 * need_bf16))
        with pytest.raises(ValueError, match=match):
            load_model(path, device="cuda", progress=False)
    with pytest.raises(ValueError, match="with fp8 experts, but cuda has"):
        load_model(path, device="cuda", progress=False, quantization="fp8")
