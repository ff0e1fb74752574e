"""The reference decoding step equals the whole-sequence op at the same positions."""
import pytest
import torch

import nsa
from nsa.ops import nsa_decode_attention
from test_reference import SMALL, make_inputs


def cache_from(x, lens, capacity, cmp_capacity, config):
    """Cache buffers [B, capacity, ...] holding the first lens[b] tokens of each row of x, garbage after."""
    B = x["q"].shape[0]
    out = {}
    for name in ("k_slc", "v_slc", "k_swa", "v_swa", "k_cmp", "v_cmp"):
        src = x[name]
        cap = cmp_capacity if name.endswith("cmp") else capacity
        buf = torch.randn(B, cap, *src.shape[2:], dtype=src.dtype) * 100  # poison: must never be read
        for b, n in enumerate(lens):
            m = config.num_cmp_tokens(n) if name.endswith("cmp") else n
            buf[b, :m] = src[b, :m]
        out[name] = buf
    return out


@pytest.mark.parametrize("S", [1, 3])
def test_decode_step_equals_full_sequence(S):
    B, T = 3, 50
    x = make_inputs(B, T, 4, 2, 8, 6, SMALL, seed=S)
    full = nsa.nsa_attention(**x, config=SMALL)
    lens = [50, 17, S + 1]  # rows of different lengths
    cache = cache_from(x, lens, capacity=64, cmp_capacity=40, config=SMALL)
    q = torch.stack([x["q"][b, n - S:n] for b, n in enumerate(lens)])
    gates = torch.stack([x["gates"][b, n - S:n] for b, n in enumerate(lens)])
    o = nsa_decode_attention(q, cache["k_cmp"], cache["v_cmp"], cache["k_slc"], cache["v_slc"], cache["k_swa"],
                             cache["v_swa"], gates, torch.tensor(lens, dtype=torch.int32), SMALL)
    for b, n in enumerate(lens):
        torch.testing.assert_close(o[b], full[b, n - S:n], rtol=1e-12, atol=1e-12)


def test_decode_rejects_lengths_past_capacity():
    x = make_inputs(1, 20, 4, 2, 8, 6, SMALL)
    cache = cache_from(x, [20], capacity=20, cmp_capacity=9, config=SMALL)
    args = (x["q"][:, -1:], cache["k_cmp"], cache["v_cmp"], cache["k_slc"], cache["v_slc"], cache["k_swa"],
            cache["v_swa"], x["gates"][:, -1:])
    with pytest.raises(ValueError, match="capacity"):
        nsa_decode_attention(*args, torch.tensor([21], dtype=torch.int32), SMALL)
    with pytest.raises(TypeError, match="cache_seqlens must be an int32"):
        nsa_decode_attention(*args, torch.tensor([20]), SMALL)
    with pytest.raises(ValueError, match="gates.*new tokens"):
        nsa_decode_attention(*args[:-1], x["gates"][:, -2:], torch.tensor([20], dtype=torch.int32), SMALL)
