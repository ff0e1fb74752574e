"""The gate mix of ops/triton/gate.py against the same math in torch."""
import pytest
import torch

from nsa.ops.triton.gate import gate_backward, gate_combine, gated_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gate_combine_and_backward(dtype):
    gen = torch.Generator().manual_seed(0)
    B, T, Hq, Dv = 2, 13, 3, 24  # Dv not a power of two: masked columns
    o = [torch.randn(B, T, Hq, Dv, generator=gen).to(dtype) for _ in range(3)]
    do = torch.randn(B, T, Hq, Dv, generator=gen).to(dtype)
    gates = torch.rand(B, T, Hq, 3, generator=gen).to(dtype)
    g = gates.float()
    expected = sum(g[..., c, None] * o[c].float() for c in range(3)).to(dtype)
    torch.testing.assert_close(gate_combine(gates, *o), expected, rtol=1e-3, atol=1e-3)

    dgates, delta = gate_backward(do, gates, *o)
    assert dgates.dtype == dtype and delta.dtype == torch.float32 and delta.shape == (3, B, Hq, T)
    for c in range(3):
        torch.testing.assert_close(dgates[..., c].float(), (do.float() * o[c].float()).sum(-1), rtol=1e-3,
                                   atol=1e-3)
        # branch c's output gradient (g_c * do, rounded to do's dtype) and its delta = rowsum(do_c * o_c)
        do_c = gated_grad(do, gates, c)
        assert torch.equal(do_c, (g[..., c, None] * do.float()).to(dtype))
        torch.testing.assert_close(delta[c], (do_c.float() * o[c].float()).sum(-1).transpose(1, 2), rtol=1e-5,
                                   atol=1e-5)
