"""The sampler's radix floors (kda_serving.ops.sampling): against float64 sorts of the definitions, on the CPU
path and on the CUDA kernel, which must also equal the CPU path bit for bit."""

import pytest
import torch
from torch.library import opcheck

from kda_serving.ops.sampling import MASS_ONE, NO_CUT, radix_floor_torch, top_k_floor, top_p_floor


def kth_largest_reference(x: torch.Tensor, ks: list[int]) -> torch.Tensor:
    ordered = x.double().sort(dim=1, descending=True).values
    return torch.stack([ordered[r, k - 1] for r, k in enumerate(ks)])


def top_p_reference(probs: torch.Tensor, top_ps: list[float]) -> torch.Tensor:
    """float64: the probability of the token with which the mass, from the largest down, first reaches top_p
    (1: no cut, 0.0)."""
    ordered = probs.double().sort(dim=1, descending=True).values
    out = []
    for r, p in enumerate(top_ps):
        n = int((ordered[r].cumsum(0) - ordered[r] < p).sum())
        out.append(0.0 if p >= 1 else float(ordered[r, n - 1]))
    return torch.tensor(out, dtype=torch.float64)


def rows_of(kind: str, rows: int, vocab: int, g: torch.Generator) -> torch.Tensor:
    """Logit rows as a model writes them: bf16-rounded (many ties), scaled from flat to very peaked, with
    masked (-inf) entries, and signed zeros."""
    scale = torch.logspace(-2, 1.5, rows).unsqueeze(1)
    x = (torch.randn(rows, vocab, generator=g) * scale)
    if kind == "bf16":
        x = x.bfloat16().float()
    elif kind == "masked":
        x = x.masked_fill(torch.rand(rows, vocab, generator=g) < 0.3, float("-inf"))
        x[:, 0] = -0.0
        x[:, -1] = 0.0
    return x


CASES = [(kind, rows, vocab) for kind, rows, vocab in (
    ("plain", 5, 300), ("bf16", 7, 4097), ("masked", 6, 1003), ("bf16", 4, 163840), ("plain", 3, 1), ("plain", 2, 3))]


@pytest.mark.parametrize("kind,rows,vocab", CASES)
def test_top_k_floor_is_the_kth_largest(kind, rows, vocab):
    g = torch.Generator().manual_seed(vocab)
    x = rows_of(kind, rows, vocab, g)
    finite = int((x > float("-inf")).sum(1).min())
    ks = [int(k) for k in torch.randint(1, vocab + 1, (rows,), generator=g)]
    ks[0], ks[-1] = 1, min(vocab, max(finite, 1))
    assert torch.equal(top_k_floor(x, ks).double(), kth_largest_reference(x, ks))


@pytest.mark.parametrize("kind,rows,vocab", CASES)
def test_top_p_floor_is_the_boundary_probability(kind, rows, vocab):
    g = torch.Generator().manual_seed(vocab + 1)
    probs = rows_of(kind, rows, vocab, g).softmax(-1)
    top_ps = [float(p) for p in torch.rand(rows, generator=g).clamp(min=1e-6)]
    top_ps[0] = 1.0
    if rows > 2:
        top_ps[1], top_ps[2] = 1e-9, 0.999999
    floor = top_p_floor(probs, top_ps)
    assert torch.equal(floor.double(), top_p_reference(probs, top_ps))
    kept = probs >= floor[:, None]
    assert bool((((probs * kept).sum(1).double() >= torch.tensor(top_ps, dtype=torch.float64) - 1e-6)).all())


def test_a_target_over_the_whole_mass_keeps_everything():
    probs = torch.full((2, 10), 0.1)
    whole = 10 * int((probs[0, 0] * MASS_ONE).long())  # a little over MASS_ONE: 0.1 rounds up in fp32
    out = radix_floor_torch(probs, torch.tensor([NO_CUT, whole + 1]), by_mass=True)
    assert out.tolist() == [0.0, 0.0]
    assert radix_floor_torch(probs, torch.tensor([whole, whole]), by_mass=True).tolist() == [probs[0, 0].item()] * 2


@pytest.mark.parametrize("call,error,match", [
    (lambda: top_k_floor(torch.randn(2, 5).double(), [1, 1]), TypeError, "float32"),
    (lambda: top_k_floor(torch.randn(5), [1]), ValueError, "rows"),
    (lambda: top_k_floor(torch.randn(2, 0), [1, 1]), ValueError, "V >= 1"),
    (lambda: top_k_floor(torch.randn(2, 5), [1]), ValueError, "one value per row"),
    (lambda: top_k_floor(torch.randn(2, 5), [0, 1]), ValueError, r"\[1, 5\]"),
    (lambda: top_k_floor(torch.randn(2, 5), [6, 1]), ValueError, r"\[1, 5\]"),
    (lambda: top_k_floor(torch.randn(2, 5), [True, 1]), ValueError, r"\[1, 5\]"),
    (lambda: top_p_floor(torch.rand(2, 5), [0.0, 0.5]), ValueError, r"\(0, 1\]"),
    (lambda: top_p_floor(torch.rand(2, 5), [float("nan"), 0.5]), ValueError, r"\(0, 1\]"),
    (lambda: top_p_floor(torch.rand(2, 5), [1.5, 0.5]), ValueError, r"\(0, 1\]"),
    (lambda: top_p_floor([[0.5, 0.5]], [0.5]), TypeError, "torch.Tensor"),
])
def test_bad_arguments_are_refused(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_radix_floor_op_passes_opcheck():
    x = torch.randn(3, 50)
    opcheck(torch.ops.kda_serving.radix_floor_.default, (x, torch.tensor([1, 7, 50]), False, torch.empty(3)),
            test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    p = x.softmax(-1)
    opcheck(torch.ops.kda_serving.radix_floor_.default, (p, torch.tensor([1, 2 ** 49, NO_CUT]), True, torch.empty(3)),
            test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_rows_spread_over_the_sms_only_while_they_leave_some_idle():
    """CTAs per row (cuda_sampling.parts_per_row) for Kimi-Linear's vocabulary on a 132-SM H100: one row gets 20
    CTAs of 8,192 entries; 64 rows 4 each; 256 rows 1; a row over 2^18 entries always gets enough that none
    takes more."""
    from kda_serving.ops.cuda_sampling import MAX_SLICE, parts_per_row

    assert [parts_per_row(rows, 163840, 132) for rows in (1, 16, 64, 256)] == [20, 16, 4, 1]
    assert parts_per_row(1000, 5 * MAX_SLICE, 132) == 5
    assert parts_per_row(3, 100, 132) == 1


def test_the_cuda_binding_refuses_what_the_kernel_cannot_take():
    from kda_serving.ops import cuda_sampling

    with pytest.raises(ValueError, match="CUDA device"):
        cuda_sampling.radix_floor(torch.rand(2, 8), torch.ones(2, dtype=torch.int64), True, torch.empty(2))
    with pytest.raises(TypeError, match="float32"):
        cuda_sampling.radix_floor(torch.rand(2, 8).double(), torch.ones(2, dtype=torch.int64), True, torch.empty(2))


GPU_CASES = CASES + [("bf16", 64, 163840), ("masked", 130, 2463), ("plain", 1, 163840)]


@pytest.mark.gpu
@pytest.mark.parametrize("kind,rows,vocab", GPU_CASES)
@pytest.mark.parametrize("strided", [False, True], ids=["rows", "strided"])
def test_kernel_equals_the_cpu_path_and_the_definition(kind, rows, vocab, strided):
    """Poisoned outputs, every row written; both modes equal to the CPU path bit for bit and to the float64
    definitions; the same again on a second call; odd strides take the kernel's scalar loads."""
    g = torch.Generator().manual_seed(rows * vocab)
    x = rows_of(kind, rows, vocab, g)
    if strided:  # rows at a stride of vocab + 1 elements: not 16-byte aligned
        wide = torch.zeros(rows, vocab + 1)
        wide[:, 1:] = x
        x = wide[:, 1:]
    ks = [int(k) for k in torch.randint(1, vocab + 1, (rows,), generator=g)]
    top_ps = [float(p) for p in torch.rand(rows, generator=g).clamp(min=1e-6)]
    top_ps[0] = 1.0
    probs = x.softmax(-1)
    xc, pc = x.cuda(), probs.cuda()
    for mode, data, data_gpu, target, ref in (
            (False, x, xc, torch.tensor(ks), kth_largest_reference(x, ks)),
            (True, probs, pc, torch.tensor([NO_CUT if p >= 1 else int(-(-p * MASS_ONE // 1)) for p in top_ps]),
             top_p_reference(probs, top_ps))):
        out = torch.full((rows,), float("nan"), device="cuda")
        torch.ops.kda_serving.radix_floor_(data_gpu, target.cuda(), mode, out)
        again = torch.full((rows,), float("nan"), device="cuda")
        torch.ops.kda_serving.radix_floor_(data_gpu, target.cuda(), mode, again)
        out, again = out.cpu(), again.cpu()
        assert not out.isnan().any(), "a row was not written"
        assert torch.equal(out, again)
        assert torch.equal(out.view(torch.int32), radix_floor_torch(data, target, mode).view(torch.int32))
        assert torch.equal(out.double(), ref), (mode, (out.double() - ref).abs().max())


@pytest.mark.gpu
def test_kernel_replays_in_a_cuda_graph():
    g = torch.Generator().manual_seed(5)
    probs = torch.randn(8, 163840, generator=g).mul(3).softmax(-1).cuda()
    top_ps = [0.1 * (i + 1) for i in range(8)]
    out = top_p_floor(probs, top_ps)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    target = torch.tensor([int(-(-p * MASS_ONE // 1)) for p in top_ps], device="cuda")
    captured = torch.full((8,), float("nan"), device="cuda")
    with torch.cuda.graph(graph):
        torch.ops.kda_serving.radix_floor_(probs, target, True, captured)
    probs.copy_(torch.randn(8, 163840, generator=g).mul(0.5).softmax(-1).cuda())
    graph.replay()
    torch.testing.assert_close(captured.cpu().double(), top_p_reference(probs.cpu(), top_ps), rtol=0, atol=0)
    assert not torch.equal(captured, out)
