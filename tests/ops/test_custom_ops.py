"""The ops are real torch custom ops: schema, fake (meta) implementation and mutation declarations hold."""

import torch
from torch.library import opcheck

from kda_testing import cu_seqlens_of, make_kda_inputs
from kda_serving.ops import kda_prefill  # noqa: F401  (registers the ops)


def test_prefill_op_passes_opcheck():
    q, k, v, g, beta, A_log, dt = make_kda_inputs(1, 40, 2, 16, generator=torch.Generator().manual_seed(0))
    pool = torch.randn(3, 2, 16, 16)
    args = (q, k, v, g, beta, A_log, dt, 0.25, None, cu_seqlens_of([15, 25]), None, None, pool,
            torch.tensor([2, 0]), torch.tensor([True, False]), None, None, None, torch.empty_like(v))
    opcheck(torch.ops.kda_serving.kda_prefill_.default, args,
            test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_decode_op_passes_opcheck():
    q, k, v, g, beta, A_log, dt = make_kda_inputs(2, 1, 2, 16, generator=torch.Generator().manual_seed(1))
    pool = torch.randn(3, 2, 16, 16)
    args = (q, k, v, g, beta, A_log, dt, 0.25, -5.0, pool, torch.tensor([2, 0]), None, torch.empty_like(v))
    opcheck(torch.ops.kda_serving.kda_decode_.default, args,
            test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_conv_ops_pass_opcheck():
    x, w = torch.randn(9, 6), torch.randn(6, 4)
    pool = torch.randn(4, 3, 6)
    opcheck(torch.ops.kda_serving.causal_conv1d_prefill_.default,
            (x, w, None, cu_seqlens_of([4, 5]), pool, torch.tensor([1, 3]), None, True, torch.empty_like(x)),
            test_utils=("test_schema", "test_faketensor"))
    opcheck(torch.ops.kda_serving.causal_conv1d_decode_.default,
            (x[:2], w, torch.randn(6), pool, torch.tensor([1, 3]), True, torch.empty_like(x[:2])),
            test_utils=("test_schema", "test_faketensor"))


def test_gated_norm_op_passes_opcheck():
    x, gate, w = torch.randn(5, 2, 16), torch.randn(5, 2, 16), torch.randn(16)
    opcheck(torch.ops.kda_serving.gated_rms_norm_.default, (x, gate, w, 1e-5, torch.empty_like(x)),
            test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_torch_compile_traces_through_prefill():
    from kda_serving.ops import kda_prefill as fn

    q, k, v, g, beta, A_log, dt = make_kda_inputs(1, 20, 2, 16, generator=torch.Generator().manual_seed(2))
    compiled = torch.compile(lambda *a: fn(*a).out * 2, fullgraph=True, backend="eager")
    assert torch.allclose(compiled(q, k, v, g, beta, A_log, dt), fn(q, k, v, g, beta, A_log, dt).out * 2)


def test_torch_compile_traces_through_gated_norm():
    from kda_serving.ops import gated_rms_norm

    x, gate = torch.randn(6, 2, 16).bfloat16(), torch.randn(6, 2, 16).bfloat16()
    w = torch.randn(16)
    compiled = torch.compile(lambda *a: gated_rms_norm(*a, 1e-5) * 2, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x, gate, w), gated_rms_norm(x, gate, w, 1e-5) * 2)


def test_attention_ops_pass_opcheck():
    q, kv = torch.randn(7, 2, 16), torch.randn(9, 2, 24)
    cu_q, cu_k = torch.tensor([0, 3, 7], dtype=torch.int32), torch.tensor([0, 4, 9], dtype=torch.int32)
    opcheck(torch.ops.kda_serving.flash_attention_.default,
            (q, kv[..., :16], kv[..., 16:], cu_q, cu_k, 4, False, 0.25, torch.empty(7, 2, 8), torch.empty(7, 2)),
            test_utils=("test_schema", "test_faketensor"))
    opcheck(torch.ops.kda_serving.merge_attention_.default,
            (torch.randn(6, 2, 8), torch.randn(6, 2), torch.tensor([4, 0, 2]), 0, torch.randn(2, 3, 2, 8),
             torch.randn(2, 3, 2)), test_utils=("test_schema", "test_faketensor"))
    flat, tables = torch.randn(32, 8), torch.randperm(8, dtype=torch.int32).view(2, 4)
    pieces = torch.tensor([[1, 2, 0], [0, 0, 5]], dtype=torch.int32)
    opcheck(torch.ops.kda_serving.gather_paged_rows.default, (flat, tables, pieces, 9, 4),
            test_utils=("test_schema", "test_faketensor"))


def test_mla_decode_op_passes_opcheck():
    """The paged MLA decode op, with and without table_rows (the verifying tokens' shared block-table rows)."""
    from kda_serving.ops import mla_decode  # noqa: F401  (registers the op)

    gen = torch.Generator().manual_seed(5)
    q, cache = torch.randn(3, 2, 24, generator=gen), torch.randn(6, 4, 24, generator=gen)
    tables = torch.tensor([[0, 3, -1], [5, 1, 2]], dtype=torch.int32)
    lens = torch.tensor([7, 12, 5], dtype=torch.int32)
    workspace = torch.empty(0)
    for rows, table in ((torch.tensor([0, 1, 1], dtype=torch.int32), tables), (None, tables[[0, 1, 1]])):
        opcheck(torch.ops.kda_serving.mla_decode_.default,
                (q, cache, table, rows, lens, 0.3, 1, workspace, workspace, torch.empty(3, 2, 16)),
                test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_moe_experts_op_passes_opcheck():
    from kda_serving.model.fp8 import quantize_rows

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 16, generator=gen)
    ids = torch.tensor([[0, 2], [1, 1], [3, 0]])
    weights = torch.rand(3, 2, generator=gen)
    gate_up, down = torch.randn(4, 24, 16, generator=gen), torch.randn(4, 16, 12, generator=gen)
    opcheck(torch.ops.kda_serving.moe_experts_gemv_.default,
            (x, ids, weights, gate_up, None, down, None, None, None, None, torch.empty_like(x)),
            test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    shared_gate_up, shared_down = torch.randn(48, 16, generator=gen), torch.randn(16, 24, generator=gen)
    opcheck(torch.ops.kda_serving.moe_experts_gemv_.default,
            (x, ids, weights, gate_up, None, down, None, shared_gate_up, shared_down, x.clone(), torch.empty_like(x)),
            test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    (q1, s1), (q2, s2) = quantize_rows(gate_up), quantize_rows(down)
    # (e4m3 inputs: the fake implementation only; opcheck's schema check multiplies the inputs, which e4m3 lacks
    # on the CPU)
    opcheck(torch.ops.kda_serving.moe_experts_gemv_.default,
            (x, ids, weights, q1, s1, q2, s2, None, None, None, torch.empty_like(x)),
            test_utils=("test_faketensor",))


def test_moe_routing_ops_pass_opcheck():
    from kda_serving.ops import moe_route  # noqa: F401  (registers the ops)

    gen = torch.Generator().manual_seed(7)
    x, router, bias = torch.randn(5, 16, generator=gen), torch.randn(32, 16, generator=gen), torch.randn(32)
    opcheck(torch.ops.kda_serving.moe_route.default, (x, router, bias, 4, 4, 2, True, 2.5),
            test_utils=("test_schema", "test_faketensor"))
    opcheck(torch.ops.kda_serving.moe_sort_pairs.default, (torch.randint(0, 32, (5, 4), generator=gen), 32),
            test_utils=("test_schema", "test_faketensor"))
