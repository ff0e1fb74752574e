"""ops/types.py: NSAInputs, and the typed kernel tuning (KernelOptions, Launch) with its checks."""
import pytest
import torch

import nsa
from nsa import KernelOptions, Launch, NSAInputs


def test_launch_overrides_only_what_is_set():
    defaults = dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    assert Launch().over(defaults) == defaults
    got = Launch(block_n=64, num_warps=8).over(defaults, block_m="BLOCK_M", block_n="BLOCK_N")
    assert got == dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2)
    assert Launch(maxnreg=128).over(dict(num_warps=4)) == dict(num_warps=4, maxnreg=128)


def test_launch_refuses_options_a_kernel_does_not_take():
    with pytest.raises(ValueError, match="Launch.block_m is not an option"):
        Launch(block_m=32).over(dict(num_warps=2))


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "4"])
def test_launch_fields_are_positive_ints(bad):
    with pytest.raises(ValueError, match="Launch.num_warps"):
        Launch(num_warps=bad)


def test_kernel_options_checks():
    with pytest.raises(TypeError, match="KernelOptions.selected_fwd must be an nsa.Launch"):
        KernelOptions(selected_fwd=dict(num_warps=2))
    with pytest.raises(ValueError, match="decode_programs"):
        KernelOptions(decode_programs=0)
    with pytest.raises(TypeError, match="pdl"):
        KernelOptions(pdl=1)
    with pytest.raises(TypeError, match="concurrent_branches must be a bool"):
        KernelOptions(concurrent_branches=None)
    x = [torch.randn(1, 40, 2, 8)] + [torch.randn(1, 2, 1, 8)] * 2 + [torch.randn(1, 40, 1, 8)] * 4
    x.append(torch.rand(1, 40, 2, 3))
    config = nsa.NSAConfig(cmp_block=8, cmp_stride=4, slc_block=8, num_selected=2, window=8)
    x[1], x[2] = torch.randn(1, config.num_cmp_tokens(40), 1, 8), torch.randn(1, config.num_cmp_tokens(40), 1, 8)
    with pytest.raises(TypeError, match="kernel_options must be None or an nsa.KernelOptions"):
        nsa.nsa_attention(*x, config, kernel_options=dict(pdl=False))


def test_nsa_inputs_unpack_in_argument_order():
    layer = nsa.NativeSparseAttention(32, 2, 1, 8, config=nsa.NSAConfig(8, 4, 8, 2, 8), backend="reference")
    x = torch.randn(1, 20, 32)
    inputs = layer.nsa_inputs(x)
    assert isinstance(inputs, NSAInputs) and inputs._fields[0] == "q" and inputs._fields[-1] == "gates"
    out = layer.o_proj(nsa.nsa_attention(*inputs, layer.config, backend="reference").flatten(2))
    torch.testing.assert_close(out, layer(x))


def test_kernel_options_travel_as_json_and_back():
    options = KernelOptions(selected_fwd=Launch(block_n=32, num_warps=1), decode_programs=8, pdl=False)
    assert KernelOptions.from_op_key(options.op_key) == options
    assert KernelOptions.from_op_key(KernelOptions().op_key) == KernelOptions()
