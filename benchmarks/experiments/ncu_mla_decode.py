"""One paged MLA decode call for ncu (N sequences of C keys, 32 heads, 16-token blocks shuffled):

    ncu --kernel-name regex:mla_decode_split --launch-skip 2 --launch-count 1 \\
        python benchmarks/experiments/ncu_mla_decode.py N C
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from kda_serving.ops import mla_decode  # noqa: E402

N, C = (int(a) for a in sys.argv[1:3])
gen = torch.Generator(device="cuda").manual_seed(0)
blocks = N * (-(-C // 16)) + 1
cache = torch.randn(blocks, 16, 576, generator=gen, device="cuda").to(torch.bfloat16)
tables = torch.randperm(blocks, generator=gen, device="cuda")[: blocks - 1].view(N, -1).to(torch.int32)
lens = torch.full((N,), C, dtype=torch.int32, device="cuda")
q = torch.randn(N, 32, 576, generator=gen, device="cuda").to(torch.bfloat16)
for _ in range(3):
    mla_decode(q, cache, tables, lens, scale=192**-0.5, max_seq_len=C, value_dim=512)
torch.cuda.synchronize()
