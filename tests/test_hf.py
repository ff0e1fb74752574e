"""nsa.convert: dense transformers models (Llama, Mistral, Qwen2, Qwen3) to NSA attention, tiny random models."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import nsa  # noqa: E402
from nsa.hf import NSAAttentionHF, init_mean_pooling  # noqa: E402

T = 24
CFG = nsa.NSAConfig(cmp_block=8, cmp_stride=4, slc_block=8, num_selected=2, window=T)  # window covers T
SMALL = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=96, vocab_size=97,
             attn_implementation="sdpa")


def tiny(arch: str, heads: int = 4, kv_heads: int = 2, head_dim: int = 16, **extra):
    kw = dict(SMALL, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim)
    kw.update(extra)
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}[arch]
    torch.manual_seed(0)
    model = cls[1](cls[0](**kw)).double().eval()
    with torch.no_grad():  # non-trivial biases / norms, so that copying them is tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


CASES = [
    ("llama", dict(heads=14, kv_heads=2, head_dim=8, hidden_size=112)),  # GQA group of 7 (5.x: hidden = heads * D)
    ("llama", dict(rope_theta=500.0, rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    ("llama", dict(attention_bias=True, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    ("mistral", dict(heads=6, kv_heads=2, head_dim=8)),  # group of 3
    ("qwen2", dict(heads=6, kv_heads=2, head_dim=8)),  # q/k/v biases
    ("qwen3", dict(heads=6, kv_heads=2, head_dim=16)),  # q_norm / k_norm
]


@pytest.mark.parametrize("arch,extra", CASES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(CASES)])
@pytest.mark.parametrize("share_kv", [True, False])
def test_convert_reproduces_dense_logits(arch, extra, share_kv):
    model = tiny(arch, **extra)
    ids = torch.randint(0, 97, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
        nsa.convert(model, CFG, share_kv=share_kv, gate_bias=40.0)  # sigmoid(-40) ~ 4e-18: no leak in float64
        assert all(isinstance(layer.self_attn, NSAAttentionHF) for layer in model.model.layers)
        got = model(ids).logits  # use_cache defaults to True: a fresh cache is allowed
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_default_gate_bias_starts_close():
    model = tiny("llama")
    ids = torch.randint(0, 97, (1, T))
    with torch.no_grad():
        want = model(ids).logits
        got = nsa.convert(model, CFG)(ids).logits
    err = (got - want).abs().max().item()
    assert 0 < err < 2e-2 * want.abs().max().item(), err


def test_mean_pooling_init():
    phi = nsa.NativeSparseAttention(32, 2, 1, 8, config=CFG).compress_k.double()
    init_mean_pooling(phi)
    blocks = torch.randn(2, 3, 8, 1, 8, dtype=torch.float64)  # [B, Tc, l, H, D]
    torch.testing.assert_close(phi(blocks), blocks.mean(2), rtol=1e-12, atol=1e-12)


def test_forward_backward_reaches_phi_and_gates():
    model = tiny("qwen3").float().train()
    nsa.convert(model, nsa.NSAConfig(cmp_block=8, cmp_stride=4, slc_block=8, num_selected=2, window=8))
    ids = torch.randint(0, 97, (2, 40))
    out = model(ids, labels=ids, use_cache=False)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for layer in model.model.layers:
        m = layer.self_attn.nsa
        for part in (m.compress_k, m.compress_v, m.gate_proj):
            grads = [p.grad for p in part.parameters()]
            assert all(g is not None and torch.isfinite(g).all() for g in grads)
            assert any(g.abs().sum() > 0 for g in grads)


def test_refusals():
    model = tiny("llama")
    nsa.convert(model, CFG)
    ids = torch.randint(1, 97, (2, 8))  # no pad token (0) inside
    with pytest.raises(NotImplementedError, match="padding"):
        model(ids, attention_mask=torch.tensor([[0] * 2 + [1] * 6, [1] * 8]))
    with pytest.raises(NotImplementedError, match="cache"):
        model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
    out = model.generate(ids, max_new_tokens=2, do_sample=False, use_cache=False, pad_token_id=0)  # re-runs all
    assert out.shape == (2, 10) and torch.equal(out[:, :8], ids)
    with pytest.raises(ValueError, match="already converted"):
        nsa.convert(model, CFG)
    with pytest.raises(ValueError, match="rope"):
        nsa.convert(tiny("llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0}), CFG)
    with pytest.raises(TypeError, match="model types"):
        nsa.convert(torch.nn.Linear(2, 2), CFG)


def test_mistral_sliding_window_matches_nsa_window():
    """Mistral's sliding window W (the query included) is NSA's window branch with window=W."""
    model = tiny("mistral", sliding_window=10)
    ids = torch.randint(0, 97, (2, T))
    with torch.no_grad():
        want = model(ids).logits
        cfg = nsa.NSAConfig(cmp_block=8, cmp_stride=4, slc_block=8, num_selected=2, window=10)
        got = nsa.convert(model, cfg, gate_bias=40.0)(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_two_stage_recipe():
    """Stage 1 (phi and gates only) lowers the loss and changes nothing else; stage 2 trains everything."""
    from nsa.hf import new_parameters

    model = tiny("llama", initializer_range=0.2).float().train()  # larger weights: attention matters more
    nsa.convert(model, nsa.NSAConfig(cmp_block=8, cmp_stride=4, slc_block=8, num_selected=2, window=8))
    ids = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(2))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    new = {id(p) for p in new_parameters(model)}

    model.requires_grad_(False)
    for p in new_parameters(model):
        p.requires_grad_(True)
    opt = torch.optim.AdamW(new_parameters(model), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(6):
        loss = model(ids, labels=ids, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(model(ids, labels=ids, use_cache=False).loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(b <= a for a, b in zip(losses, losses[1:])), losses
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (id(p) in new), n  # exactly the new ones moved

    model.requires_grad_(True)  # stage 2: everything, a lower learning rate
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(ids, labels=ids, use_cache=False).loss.backward()
    opt.step()
    assert not torch.equal(model.model.layers[0].self_attn.nsa.q_proj.weight, before["model.layers.0.self_attn.nsa.q_proj.weight"])


def tiny_nsa_hf(**kw):
    from nsa.hf_model import NSAConfigHF, NSAForCausalLM

    cfg = NSAConfigHF(vocab_size=64, n_layer=2, n_embd=64, n_head=6, n_kv_head=2, head_dim=8,
                      nsa=dict(cmp_block=8, cmp_stride=4, slc_block=8, num_selected=2, window=16), **kw)
    torch.manual_seed(0)
    return NSAForCausalLM(cfg).eval()


def test_nsa_for_causal_lm_round_trip(tmp_path):
    model = tiny_nsa_hf(share_kv=True, branches=("slc", "swa"), ungated=("slc",))
    ids = torch.randint(0, 64, (2, 24))
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model) and loaded.config.nsa == model.config.nsa and loaded.config.share_kv
    assert loaded.model.cfg.branches == ("slc", "swa") and loaded.model.cfg.ungated == ("slc",)
    assert loaded.model.lm_head.weight is loaded.model.embed.weight  # still tied
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)
    assert transformers.AutoConfig.from_pretrained(tmp_path).model_type == "nsa"


def test_nsa_for_causal_lm_labels_and_generate():
    import torch.nn.functional as F

    model = tiny_nsa_hf()
    ids = torch.randint(0, 64, (2, 24))
    labels = ids.clone()
    labels[0, :5] = -100  # ignored, as in transformers
    out = model(ids, labels=labels)
    want = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, want)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())

    with torch.no_grad():  # greedy generate() (through NSAHFCache: tests/test_hf_cache.py) = argmax of re-runs
        got = model.generate(ids[:, :5], max_new_tokens=4, do_sample=False)
        seq = ids[:, :5]
        for _ in range(4):
            seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, seq)


@pytest.mark.parametrize("padding", ["left", "right"])
def test_nsa_for_causal_lm_padded_rows_are_their_own(padding):
    """A padded row's logits and loss at its tokens are those of the row alone; padding columns count for nothing."""
    model = tiny_nsa_hf().double()
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    tokens = slice(9, 24) if padding == "left" else slice(0, 15)
    mask[1] = 0
    mask[1, tokens] = 1
    labels = ids.masked_fill(mask == 0, -100)
    if padding == "left":  # a padding column would predict the row's first token (as in transformers): ignore it
        labels[1, 9] = -100
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=labels, use_cache=False)
        alone = [model(ids[:1], labels=ids[:1]), model(ids[1:, tokens], labels=ids[1:, tokens])]
    torch.testing.assert_close(out.logits[0], alone[0].logits[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.logits[1, tokens], alone[1].logits[0], rtol=1e-10, atol=1e-10)
    want = (23 * alone[0].loss + 14 * alone[1].loss) / 37  # the mean over every predicted token
    torch.testing.assert_close(out.loss, want, rtol=1e-6, atol=0)  # transformers' loss is float32
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # what generate() derives from the mask
    torch.testing.assert_close(model(ids, attention_mask=mask, position_ids=positions, use_cache=False).logits,
                               out.logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="position_ids must count"):
        model(ids, attention_mask=mask, position_ids=torch.arange(1, 25).expand(2, -1), use_cache=False)
    with pytest.raises(ValueError, match="one non-empty contiguous run"):
        model(ids, attention_mask=torch.tensor([[1, 0] * 12, [1] * 24]), use_cache=False)
    with pytest.raises(ValueError, match=r"attention_mask must be \[batch, 24\]"):
        model(ids, attention_mask=mask[:, None, None], use_cache=False)


def test_nsa_for_causal_lm_packed_position_ids():
    """One row of sequences packed back to back (position_ids restarting at 0) runs as nsa's cu_seqlens."""
    model = tiny_nsa_hf().double()
    ids = torch.randint(0, 64, (1, 30), generator=torch.Generator().manual_seed(4))
    pos = torch.cat([torch.arange(12), torch.arange(18)])[None]
    with torch.no_grad():
        got = model(ids, position_ids=pos).logits  # no cache is made for packed rows
        apart = torch.cat([model(ids[:, :12]).logits, model(ids[:, 12:]).logits], dim=1)
    torch.testing.assert_close(got, apart, rtol=1e-10, atol=1e-10)
    with pytest.raises(NotImplementedError, match="packed sequences"):
        model(ids, position_ids=pos, use_cache=True)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_packed_position_ids(arch):
    """transformers' padding-free batches (one row, position_ids restarting at 0) run as nsa's cu_seqlens."""
    model = tiny(arch)
    ids = torch.randint(0, 97, (1, T))
    pos = torch.cat([torch.arange(10), torch.arange(T - 10)])[None]
    with torch.no_grad():
        want = model(ids, position_ids=pos, use_cache=False).logits
        nsa.convert(model, CFG, gate_bias=40.0)
        got = model(ids, position_ids=pos, use_cache=False).logits
        apart = torch.cat([model(ids[:, :10]).logits, model(ids[:, 10:]).logits], dim=1)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got, apart, rtol=1e-10, atol=1e-10)
    with pytest.raises(NotImplementedError, match="positions"):
        model(ids, position_ids=pos + 1, use_cache=False)
    with pytest.raises(NotImplementedError, match="one row"):
        model(ids.expand(2, -1), position_ids=pos.expand(2, -1))


def test_converted_checkpoint_reload(tmp_path):
    """A converted model's save_pretrained checkpoint loads back into a freshly converted model, bitwise."""
    from safetensors.torch import load_file

    model = tiny("qwen3").float()
    nsa.convert(model, CFG, share_kv=False)
    with torch.no_grad():
        for p in nsa.hf.new_parameters(model):
            p.add_(0.01 * torch.randn_like(p))  # as after training
    model.save_pretrained(tmp_path)
    fresh = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(tmp_path))
    nsa.convert(fresh, CFG, share_kv=False)
    fresh.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)
    ids = torch.randint(0, 97, (2, T))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_convert_keeps_dtype():
    model = tiny("qwen3").to(torch.bfloat16)
    nsa.convert(model, CFG)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 97, (1, T))).logits).all()


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_convert_triton_backend_reproduces_dense_logits(arch):
    """The converted model on the Triton kernels (float32, window >= T) against the dense model, forward and backward."""
    model = tiny(arch).float().cuda()
    ids = torch.randint(0, 97, (2, 64), device="cuda")
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
    nsa.convert(model, nsa.NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=2, window=64),
                backend="triton", gate_bias=40.0)
    out = model(ids, labels=ids, use_cache=False)
    torch.testing.assert_close(out.logits, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in nsa.hf.new_parameters(model))
