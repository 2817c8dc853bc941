"""fla's chunk_kda running on kda-serving's kernels (needs a CUDA GPU, fla 0.6 and kda-serving[fla]).

    python examples/fla_chunk_kda.py

fla has no plugin entry point: one call to `register()` adds our backend to fla's registry, ahead of
FlashKDA. Calls our kernels cannot take (fp32, K != 128, training, ...) still go to fla's own kernels.
With logging at INFO, fla reports "[FLA Backend] kda.chunk_kda -> kda_serving". KDA_SERVING_FLA=0 turns it off.
"""

import logging

import torch
from fla.ops.kda import chunk_kda

from kda_serving.integrations import fla_backend

logging.basicConfig(level=logging.INFO)
fla_backend.register()

B, T, H, K = 1, 4096, 16, 128
q, k, v, g = (torch.randn(B, T, H, K, dtype=torch.bfloat16, device="cuda") for _ in range(4))
beta = torch.randn(B, T, H, dtype=torch.bfloat16, device="cuda")
A_log = torch.rand(H, device="cuda")
dt_bias = torch.randn(H * K, device="cuda")
cu_seqlens = torch.tensor([0, 1000, 4096], device="cuda")
h0 = torch.zeros(2, H, K, K, device="cuda")  # [N, H, V, K] with state_v_first=True

with torch.inference_mode():
    o, ht = chunk_kda(
        q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens,
        use_gate_in_kernel=True, use_qk_l2norm_in_kernel=True, use_beta_sigmoid_in_kernel=True,
        A_log=A_log, dt_bias=dt_bias, lower_bound=None,  # the softplus gate of Kimi-Linear-48B
        state_v_first=True,
    )
print(o.shape, ht.shape)
