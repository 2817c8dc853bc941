"""The SGLang plugin: registration through SGLang's own HookRegistry, the kernel swap on KDAKernelDispatcher,
calls through the dispatcher reaching our ops, and the fallbacks to SGLang's Triton kernel.

Needs SGLang's kernel base classes and hook registry (the venv of .ci/vllm_cpu_test.sh has them). On a
CPU-only machine SGLang's kda_backend module cannot be imported (it needs torchvision, whose PyPI build is
CUDA-only), so there the hook targets a stand-in KDAKernelDispatcher at the same dotted path that forwards
calls the way SGLang's does; see docs/integrations.md for what this leaves unrun.
"""

from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch

pytest.importorskip("sglang.srt.plugins.hook_registry")
kda_triton = pytest.importorskip("sglang.srt.layers.attention.linear.kernels.kda_triton")

from sglang.srt.plugins.hook_registry import HookRegistry  # noqa: E402

from kda_serving.integrations import sglang_plugin  # noqa: E402
from kda_serving.ops import kda_recurrent_reference  # noqa: E402

TritonKDAKernel = kda_triton.TritonKDAKernel
BACKEND_MODULE = "sglang.srt.layers.attention.linear.kda_backend"
H, K = 2, 16


class StandInDispatcher:
    """The part of SGLang's KDAKernelDispatcher the plugin touches: kernels chosen in __init__, then calls
    forwarded to them (decode refuses the safe gate unless the kernel is a TritonKDAKernel, like SGLang's)."""

    def __init__(self, decode_backend=None, prefill_backend=None, verify_backend=None):
        self.decode_kernel = self.extend_kernel = self.verify_kernel = TritonKDAKernel()
        self.supports_packed_decode = getattr(self.decode_kernel, "supports_packed_decode", False)
        self.supports_packed_decode_safe_gate = False

    def decode(self, q, k, v, a, b, *, lower_bound=None, **kwargs):
        if lower_bound is not None and not isinstance(self.decode_kernel, TritonKDAKernel):
            raise NotImplementedError("safe gate decode needs a TritonKDAKernel")
        return self.decode_kernel.decode(q, k, v, a, b, lower_bound=lower_bound, **kwargs)

    def extend(self, q, k, v, g, beta, **kwargs):
        return self.extend_kernel.extend(q, k, v, g, beta, **kwargs)


@pytest.fixture
def dispatcher_cls(monkeypatch):
    """SGLang's KDAKernelDispatcher when its module imports here, else the stand-in at the same path."""
    try:
        module = importlib.import_module(BACKEND_MODULE)
    except ImportError:
        module = types.ModuleType(BACKEND_MODULE)
        module.KDAKernelDispatcher = StandInDispatcher
        monkeypatch.setitem(sys.modules, BACKEND_MODULE, module)
    original_init = module.KDAKernelDispatcher.__init__
    monkeypatch.setattr(sglang_plugin, "_registered", False)
    monkeypatch.setattr(HookRegistry, "_hooks", type(HookRegistry._hooks)(list))
    monkeypatch.setattr(HookRegistry, "_patched", set())
    yield module.KDAKernelDispatcher
    module.KDAKernelDispatcher.__init__ = original_init


def make_dispatcher(cls):
    if cls is StandInDispatcher:
        return cls()
    from sglang.srt.layers.attention.linear.utils import LinearAttnKernelBackend as B

    return cls(B.TRITON, B.TRITON, B.TRITON)


def test_entry_point_declared():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="sglang.srt.plugins")}
    assert eps.get("kda_serving") == "kda_serving.integrations.sglang_plugin:register"


def test_register_swaps_extend_and_decode_kernels(dispatcher_cls):
    assert sglang_plugin.register() is True
    assert sglang_plugin.register() is True  # idempotent: one hook
    assert len(HookRegistry._hooks[sglang_plugin.DISPATCHER_INIT]) == 1
    HookRegistry.apply_hooks()
    dispatcher = make_dispatcher(dispatcher_cls)
    from kda_serving.integrations.sglang_kernel import KDAServingSGLangKernel

    assert isinstance(dispatcher.extend_kernel, KDAServingSGLangKernel)
    assert isinstance(dispatcher.decode_kernel, KDAServingSGLangKernel)
    assert isinstance(dispatcher.decode_kernel, TritonKDAKernel)  # SGLang's safe-gate decode check passes
    assert dispatcher.supports_packed_decode is False


def test_switch_off_at_dispatcher_build(dispatcher_cls, monkeypatch):
    assert sglang_plugin.register() is True
    HookRegistry.apply_hooks()
    monkeypatch.setenv("KDA_SERVING_SGLANG", "0")
    dispatcher = make_dispatcher(dispatcher_cls)
    assert type(dispatcher.extend_kernel) is TritonKDAKernel
    assert sglang_plugin.register() is False


def test_decode_through_the_dispatcher_runs_our_ops(dispatcher_cls):
    sglang_plugin.register()
    HookRegistry.apply_hooks()
    dispatcher = make_dispatcher(dispatcher_cls)
    gen = torch.Generator().manual_seed(0)
    N = 3
    qkv = torch.randn(N, 3 * H * K, generator=gen)
    q, k, v = (t.unflatten(-1, (-1, K)).unsqueeze(0) for t in qkv.split([H * K] * 3, dim=-1))
    a, b = torch.randn(N, H * K, generator=gen), torch.randn(1, N, H, generator=gen)
    A_log, dt_bias = torch.rand(H, generator=gen).view(1, 1, H, 1), torch.randn(H * K, generator=gen)
    pool = torch.randn(5, H, K, K, generator=gen) * 0.3
    before = pool.clone()
    slots = torch.tensor([4, 1, 2], dtype=torch.int32)
    o = dispatcher.decode(q, k, v, a, b, A_log=A_log, dt_bias=dt_bias, ssm_states=pool, cache_indices=slots,
                          query_start_loc=torch.arange(N + 1, dtype=torch.int32), lower_bound=-5.0)
    ref = kda_recurrent_reference(q[0].unsqueeze(1).double().contiguous(), k[0].unsqueeze(1).double().contiguous(),
                                  v[0].unsqueeze(1).double().contiguous(), a.view(N, 1, H, K).double(),
                                  b.view(N, 1, H).double(), A_log.reshape(H), dt_bias.view(H, K), lower_bound=-5.0,
                                  initial_state=before[slots.long()], output_final_state=True)
    err = float((o[0].double() - ref.out[:, 0]).norm() / ref.out.norm())
    assert o.shape == (1, N, H, K) and err < 1e-4, err


def test_snapshot_extend_falls_back_to_triton(dispatcher_cls, monkeypatch):
    """Prefix-cache track snapshots need per-chunk states, which our kernels do not export: SGLang's Triton."""
    sglang_plugin.register()
    HookRegistry.apply_hooks()
    dispatcher = make_dispatcher(dispatcher_cls)
    calls = []
    monkeypatch.setattr(TritonKDAKernel, "extend", lambda self, *a, **kw: calls.append(kw) or "triton")
    T = 4
    x = torch.zeros(1, T, H, K)
    out = dispatcher.extend(x, x, x, x, torch.zeros(1, T, H), ssm_states=torch.zeros(2, H, K, K),
                            cache_indices=torch.tensor([0]), query_start_loc=torch.tensor([0, T]),
                            A_log=torch.zeros(H), dt_bias=torch.zeros(H * K), beta_is_raw=True,
                            return_intermediate_states=True, track_state=torch.zeros(1, H, K, K))
    assert out == "triton" and calls and calls[0]["return_intermediate_states"] is True
