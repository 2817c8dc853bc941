"""Chunked KDA (WY / UT-transform form) in PyTorch: the CPU serving path.

Within a chunk of C tokens with state S0 [V, K] at its start and in-chunk cumulative log-decays
G_i = a_1 + ... + a_i (per key channel), the delta rule unrolls to

    u_i = b_i (v_i - S0 (e^{G_i} * k_i) - sum_{j<i} A_ij u_j),     A_ij = sum_c k_ic k_jc e^{G_ic - G_jc}

so (I + diag(b) A) U = diag(b) (V - Kg S0^T) with Kg = k * e^G. One unit-triangular solve per chunk gives
W = M^-1 diag(b) Kg and U0 = M^-1 diag(b) V, after which the chunk is three matrix products:

    U   = U0 - W S0^T
    O   = scale (Qg S0^T + P U),                P_ij = sum_c q_ic k_jc e^{G_ic - G_jc}  (j <= i)
    S_C = S0 * e^{G_C} + U^T (k * e^{G_C - G})

Every exponent is of a non-positive number (see _decayed_products), so the unbounded softplus gate cannot
overflow: a channel that decays completely just becomes an exact zero. Arithmetic is float32 (float64 inputs
stay float64).
"""

from __future__ import annotations

import torch

CHUNK = 64  # tokens per chunk; CHECKPOINT_ALIGN is a multiple of it, so checkpoints fall on chunk ends
SUB_CHUNK = 16  # pairs inside a sub-block use pairwise decays; across sub-blocks, matrix products
GROUP_BUDGET = 1 << 23  # elements of [.., C, K] chunk tensors processed together


def _decayed_products(qc, kc, Gc, sub):
    """A_ij = sum_c k_ic k_jc e^{G_ic - G_jc} (j < i) and P_ij = sum_c q_ic k_jc e^{G_ic - G_jc} (j <= i).

    Without ever exponentiating a positive number: pairs within one sub-block of `sub` tokens use the
    pairwise differences directly; a pair (i, j) with j in an earlier sub-block factors through the last
    token r before i's sub-block, e^{G_i - G_j} = e^{G_i - G_r} e^{G_r - G_j}, both factors <= 1 because G is
    non-increasing. That turns the off-diagonal part into matrix products.
    """
    C = qc.shape[-2]
    A = qc.new_zeros((*qc.shape[:-1], C))
    P = qc.new_zeros((*qc.shape[:-1], C))
    causal = torch.ones(sub, sub, dtype=torch.bool, device=qc.device).tril()
    for i0 in range(0, C, sub):
        i1 = min(C, i0 + sub)
        qi, ki, Gi = qc[..., i0:i1, :], kc[..., i0:i1, :], Gc[..., i0:i1, :]
        n = i1 - i0
        diff = (Gi.unsqueeze(-2) - Gi.unsqueeze(-3)).masked_fill(~causal[:n, :n].unsqueeze(-1), float("-inf")).exp()
        kd = diff * ki.unsqueeze(-3)  # [..., i, j, c] = k_jc e^{G_ic - G_jc}
        A[..., i0:i1, i0:i1] = (kd @ ki.unsqueeze(-1)).squeeze(-1).tril(-1)
        P[..., i0:i1, i0:i1] = (kd @ qi.unsqueeze(-1)).squeeze(-1)
        if i0 == 0:
            continue
        Gr = Gc[..., i0 - 1 : i0, :]  # the last token before this sub-block
        left = (Gi - Gr).exp()  # <= 1
        right = kc[..., :i0, :] * (Gr - Gc[..., :i0, :]).exp()  # <= 1
        A[..., i0:i1, :i0] = (ki * left) @ right.transpose(-1, -2)
        P[..., i0:i1, :i0] = (qi * left) @ right.transpose(-1, -2)
    return A, P


def _intra(qc, kc, vc, Gc, bc, sub=SUB_CHUNK):
    """One group of chunks, [..., C, D] tensors. Returns W, U0, P, Qg, Kend, gC (see the module docstring)."""
    C = qc.shape[-2]
    A, P = _decayed_products(qc, kc, Gc, sub)
    eye = torch.eye(C, dtype=qc.dtype, device=qc.device)
    M = eye + bc.unsqueeze(-1) * A  # unit lower triangular
    eG = Gc.exp()
    rhs = torch.cat([bc.unsqueeze(-1) * kc * eG, bc.unsqueeze(-1) * vc], dim=-1)
    sol = torch.linalg.solve_triangular(M, rhs, upper=False, unitriangular=True)
    K = kc.shape[-1]
    W, U0 = sol[..., :K], sol[..., K:]
    Gend = Gc[..., -1:, :]
    Kend = kc * (Gend - Gc).exp()
    return W, U0, P, qc * eG, Kend, Gend.squeeze(-2).exp()


def chunked_scan(q, k, v, a, b, S, scale, lens, checkpoints=None, chunk: int = CHUNK):
    """Same contract as reference.recurrent_scan (padded layout [N, Tmax, ...], inert padding)."""
    N, tmax, H, K = q.shape
    V = v.shape[-1]
    C = chunk
    nc = max(1, -(-tmax // C))
    pad = nc * C - tmax

    def blocks(x):  # [N, T, H, D] -> [N, H, nc, C, D]
        if pad:
            x = torch.cat([x, x.new_zeros((N, pad, *x.shape[2:]))], dim=1)
        return x.reshape(N, nc, C, H, -1).permute(0, 3, 1, 2, 4)

    qc, kc, vc, ac = blocks(q), blocks(k), blocks(v), blocks(a)
    bc = blocks(b.unsqueeze(-1)).squeeze(-1)  # [N, H, nc, C]
    Gc = ac.cumsum(-2)
    o = torch.empty((N, H, nc, C, V), dtype=v.dtype, device=v.device)

    wanted: dict[int, list[tuple[int, int]]] = {}
    ckpt = None
    if checkpoints is not None:
        ckpt = S.new_zeros((len(checkpoints.seq), H, V, K))
        for m, (n, p) in enumerate(zip(checkpoints.seq.tolist(), checkpoints.pos.tolist())):
            wanted.setdefault(p // C - 1, []).append((m, n))

    group = max(1, GROUP_BUDGET // max(1, N * H * C * max(K, V)))
    ST = S.transpose(-1, -2)  # [N, H, K, V]
    for c0 in range(0, nc, group):
        c1 = min(nc, c0 + group)
        W, U0, P, Qg, Kend, gC = _intra(qc[:, :, c0:c1], kc[:, :, c0:c1], vc[:, :, c0:c1], Gc[:, :, c0:c1], bc[:, :, c0:c1])
        for c in range(c1 - c0):
            U = U0[:, :, c] - W[:, :, c] @ ST
            o[:, :, c0 + c] = scale * (Qg[:, :, c] @ ST + P[:, :, c] @ U)
            ST = ST * gC[:, :, c].unsqueeze(-1) + Kend[:, :, c].transpose(-1, -2) @ U
            for m, n in wanted.get(c0 + c, ()):
                ckpt[m] = ST[n].transpose(-1, -2)
    o = o.permute(0, 2, 3, 1, 4).reshape(N, nc * C, H, V)[:, :tmax]
    return o, ST.transpose(-1, -2).contiguous(), ckpt
