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

from .layout import _token_owner

CHUNK = 64  # tokens per chunk; CHECKPOINT_ALIGN is a multiple of it, so checkpoints fall on chunk ends
SUB_CHUNK = 8  # pairs inside a sub-block use pairwise decays; across sub-blocks, matrix products (8: 1.5-2x
# faster than 16 on the CPU, 2 x 1,024 tokens x 2 heads of 128: 35 vs 70 ms; 4 no faster)
GROUP_BUDGET = 1 << 23  # elements of [.., C, K] chunk tensors processed together
GROUP_PADDING = 2  # length_groups: a group's padded chunks at most this many times its sequences' own
# A group whose longest sequence has at most this many tokens steps the recurrence token by token instead of
# filling a chunk: 16 decodes in a mixed step cost 0.4 ms this way, 20 ms as 16 chunks of 64 (a sequence of
# 16 tokens alone: 1.2 vs 2.2 ms; they tie at 32).
RECURRENT_MAX_TOKENS = 16


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


def length_groups(lens: list[int], chunk: int = CHUNK) -> list[list[int]]:
    """The sequences (indices into lens) in groups to scan together, longest first: a group pads its sequences
    to its longest, so a sequence joins one only while the group's padded chunks stay within GROUP_PADDING
    times the chunks its sequences need. One group where lengths are alike; a prompt chunk among decodes is
    scanned apart from them instead of padding each decode to its length (a 496-token chunk and 16 decodes:
    17 x 8 chunks otherwise, 8 + 16 this way)."""
    order = sorted(range(len(lens)), key=lambda n: -lens[n])
    groups, need = [], 0
    for n in order:
        chunks = max(1, -(-lens[n] // chunk))
        if groups:
            longest = max(1, -(-lens[groups[-1][0]] // chunk))
            if (len(groups[-1]) + 1) * longest <= GROUP_PADDING * (need + chunks):
                groups[-1].append(n)
                need += chunks
                continue
        groups.append([n])
        need = chunks
    return groups


def cpu_step(S, q_t, k_t, v_t, a_t, b_t, scale):
    """reference.recurrent_step rearranged for the CPU (same shapes and result): S' k and S' q come from one
    batched product of the old state with the decayed vectors (S' = S diag(e^a), so S' x = S (e^a * x)), and
    o = scale (S' q + u (k . q)) = scale S'' q, so the state is read twice and written once instead of read
    four times and written twice. The products take the vectors as rows (x^T S^T): on the CPU a batch of
    matrix-vector products with the vector as a column ran 8x slower (518 vs 66 us for 32 heads of 128 x 128,
    one thread), which made it most of the embedded model's decode time."""
    n, H, V, K = S.shape
    decay = a_t.exp().reshape(n * H, 1, K)
    k, q = k_t.reshape(n * H, 1, K), q_t.reshape(n * H, 1, K)
    heads = S.view(n * H, V, K)
    sk, sq = torch.bmm(torch.cat((decay * k, decay * q), dim=1), heads.transpose(1, 2)).unbind(1)  # [nH, V]
    u = b_t.reshape(n * H, 1) * (v_t.reshape(n * H, V) - sk)
    new = torch.addcmul(heads * decay, u.unsqueeze(-1), k)
    o = scale * (sq + u * (k * q).sum(-1))
    return new.view(n, H, V, K), o.view(n, H, V)


def _recurrent(q, k, v, a, b, S, scale):
    """A group of short sequences (no checkpoints: those fall on multiples of CHUNK), token by token."""
    o = torch.empty((*v.shape[:3], v.shape[3]), dtype=v.dtype, device=v.device)
    for t in range(q.shape[1]):
        S, o[:, t] = cpu_step(S, q[:, t], k[:, t], v[:, t], a[:, t], b[:, t], scale)
    return o, S, None


def chunked_scan(q, k, v, a, b, S, scale, lens, checkpoints=None, chunk: int = CHUNK):
    """Same contract as reference.recurrent_scan (padded layout [N, Tmax, ...], inert padding): every sequence
    padded to the longest, so for sequences of like lengths (scan_packed groups unlike ones first). At most
    RECURRENT_MAX_TOKENS tokens step the recurrence instead of filling a chunk."""
    if q.shape[1] <= RECURRENT_MAX_TOKENS and (checkpoints is None or not len(checkpoints.seq)):
        return _recurrent(q, k, v, a, b, S, scale)
    return _scan(q, k, v, a, b, S, scale, lens, checkpoints, chunk)


def scan_packed(q, k, v, a, b, S, scale, lens: list[int], checkpoints=None, chunk: int = CHUNK):
    """The scan of packed sequences: q, k, a [T, H, K], v [T, H, V], b [T, H], sequence n owning the next
    lens[n] rows; S [N, H, V, K] their initial states. Sequences of like lengths (length_groups) are padded
    together to their own longest and scanned by chunked_scan, so a prompt chunk among decodes pads nothing
    to its length. Returns (o [T, H, V], final states [N, H, V, K], checkpoint states or None)."""
    lens_t = torch.tensor(lens, dtype=torch.long)
    starts = lens_t.cumsum(0) - lens_t
    o = v.new_empty(v.shape)
    S_out = torch.empty_like(S)
    ckpt = None if checkpoints is None else S.new_zeros((len(checkpoints.seq), *S.shape[1:]))
    for group in length_groups(lens, chunk):
        index = torch.tensor(group, dtype=torch.long)
        group_lens = lens_t[index]
        t = max(1, int(group_lens.max()))
        seq, pos = _token_owner(group_lens)  # the group's tokens, packed
        rows = starts[index][seq] + pos

        def padded(x):  # the group's sequences as [n, t, ...], zeros (inert) past each one's end
            out = x.new_zeros((len(group), t, *x.shape[1:]))
            out[seq, pos] = x[rows]
            return out

        sub, mine = None, None
        if checkpoints is not None:  # this group's checkpoints, their sequences renumbered within it
            local = {n: i for i, n in enumerate(group)}
            mine = [m for m, n in enumerate(checkpoints.seq.tolist()) if n in local]
            sub = type(checkpoints)(torch.tensor([local[int(checkpoints.seq[m])] for m in mine], dtype=torch.long),
                                    checkpoints.pos[mine], checkpoints.slot[mine])
        o_g, S_g, ckpt_g = chunked_scan(padded(q), padded(k), padded(v), padded(a), padded(b), S[index], scale,
                                        group_lens, sub, chunk)
        o[rows] = o_g[seq, pos]
        S_out[index] = S_g
        if mine:
            ckpt[mine] = ckpt_g
    return o, S_out, ckpt


def _scan(q, k, v, a, b, S, scale, lens, checkpoints=None, chunk: int = CHUNK):
    """chunked_scan of one group: every sequence padded to the longest."""
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
        W, U0, P, Qg, Kend, gC = _intra(qc[:, :, c0:c1], kc[:, :, c0:c1], vc[:, :, c0:c1], Gc[:, :, c0:c1],
                                        bc[:, :, c0:c1])
        for c in range(c1 - c0):
            U = U0[:, :, c] - W[:, :, c] @ ST
            o[:, :, c0 + c] = scale * (Qg[:, :, c] @ ST + P[:, :, c] @ U)
            ST = ST * gC[:, :, c].unsqueeze(-1) + Kend[:, :, c].transpose(-1, -2) @ U
            for m, n in wanted.get(c0 + c, ()):
                ckpt[m] = ST[n].transpose(-1, -2)
    o = o.permute(0, 2, 3, 1, 4).reshape(N, nc * C, H, V)[:, :tmax]
    return o, ST.transpose(-1, -2).contiguous(), ckpt
