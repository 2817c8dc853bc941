"""The algebra behind the CUDA prefill's time segments (csrc/prefill/segments.cuh), checked in float64 on the
token-by-token reference (states passed between runs in float32, as the reference takes them): a segment run from the state S equals the run from zero plus S times the run on the
identity rows with v = 0, for the outputs (o_t = o_t^0 + S w_t) and the final state (S P + L); chained over
segments (S_{g+1} = S_g P_g + L_g) this reproduces the whole sequence."""

import pytest
import torch

from kda_testing import EXTREME_GATES, MILD_GATES, make_kda_inputs, rel_err
from kda_serving.ops import kda_recurrent_reference

GATES = {"mild": MILD_GATES, "extreme": EXTREME_GATES}
FORMS = {"softplus": None, "lower_bound": -5.0}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("gates", GATES)
def test_segments_chained_reproduce_the_sequence(gates, form):
    gen = torch.Generator().manual_seed(len(gates) * 10 + len(form))
    T, H, K = 70, 2, 32  # the identity-row run needs V == K
    q, k, v, g, beta, A_log, dt = make_kda_inputs(1, T, H, K, generator=gen, **GATES[gates])
    S0 = torch.randn(1, H, K, K, generator=gen)
    kw = dict(lower_bound=FORMS[form], output_final_state=True)
    whole = kda_recurrent_reference(q, k, v, g, beta, A_log, dt, initial_state=S0, **kw)

    bounds = [0, 16, 33, 70]  # segment 0, then two more (one not chunk-aligned: the algebra does not care)
    identity = torch.eye(K).expand(1, H, K, K).contiguous()
    S, outs = S0, []
    for t0, t1 in zip(bounds[:-1], bounds[1:]):
        part = [x[:, t0:t1] for x in (q, k, v, g, beta)]
        if t0 == 0:  # segment 0 from the real state
            run = kda_recurrent_reference(*part, A_log, dt, initial_state=S, **kw)
            outs.append(run.out)
            S = run.final_state.float()
            continue
        local = kda_recurrent_reference(*part, A_log, dt, initial_state=torch.zeros_like(S), **kw)
        part[2] = torch.zeros_like(part[2])  # v = 0
        trans = kda_recurrent_reference(*part, A_log, dt, initial_state=identity, **kw)
        S64 = S.double()
        outs.append(local.out + torch.einsum("bthi,nhvi->bthv", trans.out, S64))  # o_t = o_t^0 + S_g w_t
        S = (torch.einsum("nhvi,nhik->nhvk", S64, trans.final_state) + local.final_state).float()  # S_g P_g + L_g

    # float32 hand-over between runs: ~1e-7 relative; a wrong decomposition is off by O(1)
    assert rel_err(torch.cat(outs, dim=1), whole.out) < 1e-5
    assert rel_err(S, whole.final_state) < 1e-5
