"""NativeSparseAttention layer and rotary embedding: shapes, gradients, varlen, validation, compression coverage."""
import pytest
import torch

from nsa import KernelOptions, LanguageModel, Launch, ModelConfig, NativeSparseAttention, NSAConfig
from nsa.rope import apply_rope, positions_from_cu_seqlens

# small blocks so that T = 40 already has compressed tokens, several selection blocks and a partial window
CFG = NSAConfig(cmp_block=8, cmp_stride=4, slc_block=8, num_selected=2, window=8)
HIDDEN = 32


def make_layer(num_heads=4, num_kv_heads=2, head_dim=8, v_head_dim=None, share_kv=False, seed=0):
    torch.manual_seed(seed)
    layer = NativeSparseAttention(HIDDEN, num_heads, num_kv_heads, head_dim, v_head_dim, config=CFG,
                                  share_kv=share_kv, backend="reference").double()
    for p in layer.parameters():  # random values everywhere (zero-initialized embeddings included)
        torch.nn.init.normal_(p, std=0.3)
    return layer


def scores(q, k):
    """q [B, T, Hq, D], k [B, N, Hkv, D] -> [B, Hq, T, N], query head h against key head h // G."""
    G = q.shape[2] // k.shape[2]
    return torch.einsum("bthd,bnhd->bhtn", q, k.repeat_interleave(G, dim=2))


@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim, v_head_dim",
                         [(2, 2, 8, None), (4, 2, 8, 4), (4, 1, 4, 12)])
def test_forward_backward_shapes(num_heads, num_kv_heads, head_dim, v_head_dim):
    layer = make_layer(num_heads, num_kv_heads, head_dim, v_head_dim)
    x = torch.randn(2, 40, HIDDEN, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates = layer.nsa_inputs(x)
    Dv = v_head_dim or head_dim
    assert q.shape == (2, 40, num_heads, head_dim)
    assert k_cmp.shape == (2, CFG.num_cmp_tokens(40), num_kv_heads, head_dim)
    assert v_cmp.shape == (2, CFG.num_cmp_tokens(40), num_kv_heads, Dv)
    assert k_slc.shape == k_swa.shape == (2, 40, num_kv_heads, head_dim)
    assert v_slc.shape == v_swa.shape == (2, 40, num_kv_heads, Dv)
    assert gates.shape == (2, 40, num_heads, 3) and 0 < gates.min() and gates.max() < 1
    y.square().sum().backward()
    assert x.grad.shape == x.shape
    for name, p in layer.named_parameters():  # every branch is wired: every parameter gets a gradient
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_three_branch_projections_are_independent():
    layer = make_layer()
    _, _, _, k_slc, v_slc, k_swa, v_swa, _ = layer.nsa_inputs(torch.randn(1, 40, HIDDEN, dtype=torch.float64))
    assert not torch.allclose(k_slc, k_swa) and not torch.allclose(v_slc, v_swa)


def test_share_kv_equals_three_copies_of_one_projection():
    shared = make_layer(share_kv=True)
    separate = make_layer(share_kv=False)
    assert separate.kv_proj.weight.shape[0] == 3 * shared.kv_proj.weight.shape[0]
    state = shared.state_dict()
    state["kv_proj.weight"] = state["kv_proj.weight"].repeat(3, 1)  # the same rows for cmp, slc and swa
    separate.load_state_dict(state)
    x = torch.randn(2, 40, HIDDEN, dtype=torch.float64)
    torch.testing.assert_close(shared(x), separate(x))
    _, _, _, k_slc, v_slc, k_swa, v_swa, _ = shared.nsa_inputs(x)
    assert k_slc is k_swa and v_slc is v_swa


def test_varlen_packed_equals_each_sequence_alone():
    layer = make_layer(num_heads=4, num_kv_heads=2, head_dim=8, v_head_dim=6)
    lens = [37, 5, 0, 20]  # 5 < cmp_block: no compressed token; 0: an empty sequence
    seqs = [torch.randn(1, n, HIDDEN, dtype=torch.float64) for n in lens]
    cu_seqlens = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    packed = layer(torch.cat(seqs, dim=1), cu_seqlens=cu_seqlens)
    alone = torch.cat([layer(s) for s in seqs if s.shape[1]], dim=1)
    torch.testing.assert_close(packed, alone)
    k_cmp = layer.nsa_inputs(torch.cat(seqs, dim=1), cu_seqlens=cu_seqlens)[1]
    assert k_cmp.shape[1] == sum(CFG.num_cmp_tokens(n) for n in lens)


@pytest.mark.parametrize("kwargs, name", [
    ({"hidden_size": 0}, "hidden_size"),
    ({"num_heads": 4, "num_kv_heads": 3}, "num_kv_heads"),
    ({"num_kv_heads": 0}, "num_kv_heads"),
    ({"head_dim": 7}, "head_dim"),
    ({"v_head_dim": -1}, "v_head_dim"),
    ({"config": {"cmp_block": 8}}, "config"),
    ({"rope_base": 0.0}, "rope_base"),
])
def test_bad_constructor_args_name_the_argument(kwargs, name):
    args = {"hidden_size": HIDDEN, "num_heads": 4, "num_kv_heads": 2, "head_dim": 8, **kwargs}
    with pytest.raises(ValueError, match=name):
        NativeSparseAttention(**args)


def test_bad_input_raises():
    layer = make_layer()
    with pytest.raises(ValueError, match="x must be"):
        layer(torch.randn(40, HIDDEN, dtype=torch.float64))
    with pytest.raises(ValueError, match="hidden_size"):
        layer(torch.randn(1, 40, HIDDEN + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="cu_seqlens"):
        layer(torch.randn(2, 40, HIDDEN, dtype=torch.float64), cu_seqlens=torch.tensor([0, 40], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens"):
        layer(torch.randn(1, 40, HIDDEN, dtype=torch.float64), cu_seqlens=torch.tensor([0, 30], dtype=torch.int32))


def test_kernel_options_reach_every_op_the_layer_runs():
    """The layer passes its kernel_options to the training op and the decoding step: a Launch field that a
    kernel does not take is refused at that kernel's launch (Triton backend; the interpreter on a CPU)."""
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(1, 40, HIDDEN, device=device)
    bad_banded = KernelOptions(banded_fwd=Launch(block=16))  # the window/compressed kernels take block_m, block_n
    layer = NativeSparseAttention(HIDDEN, 4, 2, 8, config=CFG, backend="triton", kernel_options=bad_banded).to(device)
    with pytest.raises(ValueError, match="Launch.block is not an option"):
        layer(x)
    cache = layer.new_cache(1, 48, dtype=torch.float32, device=device)
    with pytest.raises(ValueError, match="Launch.block is not an option"):
        layer.prefill(x, cache)
    layer.kernel_options = None
    layer.prefill(x, cache)
    layer.kernel_options = KernelOptions(decode_cmp=Launch(block_m=16))  # the decoding kernels take block
    with pytest.raises(ValueError, match="Launch.block_m is not an option"):
        layer.step(x[:, :1], cache)
    with pytest.raises(TypeError, match="kernel_options must be None or an nsa.KernelOptions"):
        NativeSparseAttention(HIDDEN, 4, 2, 8, kernel_options={"pdl": False})
    model = LanguageModel(ModelConfig(n_layer=2, n_embd=HIDDEN, n_head=4, n_kv_head=2, nsa=CFG),
                          kernel_options=bad_banded)
    assert all(block.attn.kernel_options is bad_banded for block in model.blocks)


def test_optimizer_steps_lower_the_loss():
    layer = make_layer().float()
    torch.nn.init.normal_(layer.o_proj.weight, std=0.05)
    x, target = torch.randn(2, 40, HIDDEN), torch.randn(2, 40, HIDDEN)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = (layer(x) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_compressed_token_i_covers_raw_tokens_id_to_id_plus_l():
    layer = make_layer()
    x = torch.randn(1, 40, HIDDEN, dtype=torch.float64)
    _, k_cmp, v_cmp = layer.nsa_inputs(x)[:3]
    l, d = CFG.cmp_block, CFG.cmp_stride
    for u in (0, 3, 4, 17, 35, 39):  # 39 is in no block: (40 - 8) // 4 + 1 = 9 tokens cover [0, 40) up to 39
        x2 = x.clone()
        x2[0, u] += 1.0
        _, k2, v2 = layer.nsa_inputs(x2)[:3]
        changed = ((k2 - k_cmp).abs().amax(dim=(0, 2, 3)) > 0) | ((v2 - v_cmp).abs().amax(dim=(0, 2, 3)) > 0)
        expected = torch.tensor([i * d <= u < i * d + l for i in range(k_cmp.shape[1])])
        assert torch.equal(changed, expected), u


def test_compressed_keys_sit_at_the_block_centre():
    """Prepending d tokens shifts every block by one stride: scores q_t . k_cmp[i] must not change."""
    layer = make_layer()
    d = CFG.cmp_stride
    x = torch.randn(1, 40, HIDDEN, dtype=torch.float64)
    shifted = torch.cat([torch.randn(1, d, HIDDEN, dtype=torch.float64), x], dim=1)
    q, k_cmp = layer.nsa_inputs(x)[:2]
    q2, k2 = layer.nsa_inputs(shifted)[:2]
    torch.testing.assert_close(scores(q2[:, d:], k2[:, 1:]), scores(q, k_cmp))
    # the absolute position: the summary of un-rotated raw keys, rotated to the block centre i*d + (l - 1) / 2
    l, i = CFG.cmp_block, 2
    raw_k = layer.kv_proj(x).view(1, 40, 3, 2, 16)[:, :, 0, :, :8]  # cmp keys: set 0, first Dk = 8 channels
    summary = layer.compress_k(raw_k[:, None, i * d:i * d + l])  # [1, 1, Hkv, Dk]
    torch.testing.assert_close(k_cmp[:, i:i + 1], apply_rope(summary, torch.tensor([i * d + (l - 1) / 2])))


def test_rope_scores_depend_only_on_relative_position():
    q, k = torch.randn(1, 1, 2, 16, dtype=torch.float64), torch.randn(1, 1, 2, 16, dtype=torch.float64)
    def score(t, u):
        return scores(apply_rope(q, torch.tensor([t])), apply_rope(k, torch.tensor([u])))
    torch.testing.assert_close(score(7.0, 2.5), score(107.0, 102.5))
    assert not torch.allclose(score(7.0, 2.5), score(7.0, 3.5))
    x = torch.randn(1, 5, 2, 16)
    torch.testing.assert_close(apply_rope(x, torch.zeros(5)), x)  # position 0 is the identity
    torch.testing.assert_close(apply_rope(x, torch.arange(5.0)).norm(dim=-1), x.norm(dim=-1))  # a rotation


def test_positions_restart_in_every_packed_sequence():
    cu = torch.tensor([0, 3, 3, 5, 9], dtype=torch.int32)
    assert positions_from_cu_seqlens(cu).tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3]
