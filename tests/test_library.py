"""The custom ops of nsa/ops/library.py: torch.library.opcheck on small CPU inputs (schema, fake tensors, autograd
registration, AOT dispatch), and the public entries go through them."""
import pytest
import torch

import nsa
from nsa.ops import library, reference
from torch.utils._python_dispatch import TorchDispatchMode

CFG = nsa.NSAConfig(cmp_block=8, cmp_stride=4, slc_block=8, num_selected=3, window=8)
B, T, HQ, HKV, D, DV = 2, 40, 4, 2, 8, 6


def _inputs(dtype=torch.float64, T=T, B=B, requires_grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    tc = CFG.num_cmp_tokens(T)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    xs = [r(B, T, HQ, D), r(B, tc, HKV, D), r(B, tc, HKV, DV), r(B, T, HKV, D), r(B, T, HKV, DV),
          r(B, T, HKV, D), r(B, T, HKV, DV), torch.rand(B, T, HQ, 3, generator=g, dtype=dtype)]
    return [x.requires_grad_(requires_grad) for x in xs]


def _params(backend="reference", scale=D ** -0.5):
    return (*library.config_ints(CFG), scale, backend, "")


def test_attention_opcheck_reference():
    torch.library.opcheck(torch.ops.nsa.attention, (*_inputs(), *_params(), None, None))


def test_attention_opcheck_reference_packed():
    lens = [13, 0, 27]
    cu = torch.tensor([0, 13, 13, 40], dtype=torch.int32)
    tc = sum(CFG.num_cmp_tokens(n) for n in lens)
    xs = _inputs(B=1)
    xs[1], xs[2] = xs[1][:, :tc].detach().requires_grad_(), xs[2][:, :tc].detach().requires_grad_()
    torch.library.opcheck(torch.ops.nsa.attention, (*xs, *_params(), cu, lens))


def test_attention_backward_opcheck_reference():
    xs = _inputs(requires_grad=False)
    empty = [torch.empty(0, dtype=torch.float64)] * 7
    do = torch.randn(B, T, HQ, DV, dtype=torch.float64)
    torch.library.opcheck(torch.ops.nsa.attention_backward, (do, *xs, *empty, *_params(), None, None))


def test_select_blocks_opcheck_reference():
    q, k_cmp = _inputs(requires_grad=False)[:2]
    torch.library.opcheck(torch.ops.nsa.select_blocks, (q, k_cmp, *_params(), None, None))


def _decode_args(backend="reference", dtype=torch.float64, error_flag=False):
    cap = 24
    g = torch.Generator().manual_seed(1)
    cc = CFG.num_cmp_tokens(cap)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    S = 2
    xs = [r(B, S, HQ, D), r(B, cc, HKV, D), r(B, cc, HKV, DV), r(B, cap, HKV, D), r(B, cap, HKV, DV),
          r(B, cap, HKV, D), r(B, cap, HKV, DV), torch.rand(B, S, HQ, 3, generator=g, dtype=dtype)]
    lens = torch.tensor([5, 24], dtype=torch.int32)
    flag = torch.zeros(1, dtype=torch.int32) if error_flag else None
    return (*xs, lens, *_params(backend), None, flag)


def test_decode_attention_opcheck_reference():
    torch.library.opcheck(torch.ops.nsa.decode_attention, _decode_args())


def test_decode_attention_opcheck_reference_host_seqlens():
    args = list(_decode_args())
    args[-2] = [5, 24]
    torch.library.opcheck(torch.ops.nsa.decode_attention, tuple(args))


def test_decode_attention_reference_checks_lengths_inside_the_op():
    args = list(_decode_args())
    args[8] = torch.tensor([1, 24], dtype=torch.int32)  # row 0 holds fewer tokens than the 2 new ones
    with pytest.raises(ValueError, match=r"cache_seqlens\[0\]"):
        torch.ops.nsa.decode_attention(*args)


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_public_entries_call_the_custom_ops():
    xs = _inputs()
    with _Recorder() as rec:
        o = nsa.nsa_attention(*xs, CFG, backend="reference")
        nsa.select_blocks(xs[0], xs[1], CFG, backend="reference")
    assert "nsa.attention.default" in rec.ops and "nsa.select_blocks.default" in rec.ops
    want = reference.nsa_attention(*xs, CFG, D ** -0.5)
    torch.testing.assert_close(o, want, rtol=0, atol=0)
    grads = torch.autograd.grad(o.square().sum(), xs)
    want_grads = torch.autograd.grad(want.square().sum(), xs)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    ids = nsa.select_blocks(xs[0], xs[1], CFG, backend="reference")
    assert ids.dtype == torch.long and ids.shape == (B, T, HKV, CFG.num_selected)


def test_shared_kv_tensors_get_both_gradients():
    """share_kv passes the same tensor as k_slc and k_swa: its gradient is the sum of both branches'."""
    xs = _inputs()
    shared = list(xs)
    shared[5], shared[6] = shared[3], shared[4]
    o = nsa.nsa_attention(*shared, CFG, backend="reference")
    g = torch.autograd.grad(o.sum(), shared[3])[0]
    want = torch.autograd.grad(reference.nsa_attention(*shared, CFG, D ** -0.5).sum(), shared[3])[0]
    torch.testing.assert_close(g, want, rtol=1e-12, atol=1e-12)


def test_kernel_options_travel_as_a_string():
    opts = nsa.KernelOptions(selected_fwd=nsa.Launch(num_warps=2), decode_programs=3, pdl=False)
    assert library.options_key(None) == ""
    assert library._options("") == library._options(library.options_key(nsa.KernelOptions())) == nsa.KernelOptions()
    assert library._options(library.options_key(opts)) == opts


def test_attention_opcheck_triton_interpreter():
    pytest.importorskip("triton")
    xs = _inputs(dtype=torch.float32, B=1, T=24)
    torch.library.opcheck(torch.ops.nsa.attention, (*xs, *_params("triton"), None, None),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_decode_attention_opcheck_triton_interpreter():
    pytest.importorskip("triton")
    torch.library.opcheck(torch.ops.nsa.decode_attention, _decode_args("triton", torch.float32, error_flag=True),
                          test_utils=("test_schema", "test_faketensor"))
