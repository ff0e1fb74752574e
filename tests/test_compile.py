"""torch.compile over the NSA model: the ops are custom ops (nsa/ops/library.py) and the dense path reads nothing on
the host, so a whole training step traces with fullgraph=True (backend aot_eager on the CPU: forward and backward
graphs through AOTAutograd, run eagerly)."""
import pytest
import torch

import nsa

CFG = nsa.NSAConfig(cmp_block=8, cmp_stride=4, slc_block=8, num_selected=3, window=8)


def _model(backend="reference", **kw):
    torch.manual_seed(0)
    mc = nsa.ModelConfig(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, nsa=CFG, backend=backend, **kw)
    return nsa.LanguageModel(mc)


def _loss_and_grads(model, run, idx, targets):
    model.zero_grad(set_to_none=True)
    logits, loss = run(idx, targets)
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_model_fullgraph_forward_backward_matches_eager():
    torch._dynamo.reset()
    model = _model()
    g = torch.Generator().manual_seed(1)
    idx, targets = torch.randint(0, 256, (2, 40), generator=g), torch.randint(0, 256, (2, 40), generator=g)
    logits, loss, grads = _loss_and_grads(model, model, idx, targets)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    c_logits, c_loss, c_grads = _loss_and_grads(model, compiled, idx, targets)
    torch.testing.assert_close(c_logits, logits)
    torch.testing.assert_close(c_loss, loss)
    assert c_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(c_grads[name], grads[name], msg=name)


def test_model_fullgraph_shared_kv():
    torch._dynamo.reset()
    model = _model(share_kv=True)
    idx = torch.randint(0, 256, (1, 33), generator=torch.Generator().manual_seed(2))
    want = model(idx)[0]
    got = torch.compile(model, backend="aot_eager", fullgraph=True)(idx)[0]
    torch.testing.assert_close(got, want)


def test_packed_batch_compiles_with_a_graph_break():
    """cu_seqlens is checked and split on the host (one .tolist()): not fullgraph, but compiles and agrees."""
    torch._dynamo.reset()
    model = _model()
    idx = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(3))
    cu = torch.tensor([0, 15, 40], dtype=torch.int32)
    want = model(idx, cu_seqlens=cu)[0]
    got = torch.compile(model, backend="aot_eager")(idx, cu_seqlens=cu)[0]
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_prefill_and_decoding_steps_fullgraph_match_eager(backend):
    """model(prompt, cache=empty_cache) (prefill), then model(tokens, cache=cache) steps: the cache's host mirror (host_seqlens, ring_start) is
    Python state that the compiled step updates (Dynamo replays the mutation); its ints become dynamic after the
    first recompiles, so the steps settle on a few graphs instead of one per length."""
    if backend == "triton":
        pytest.importorskip("triton")  # the kernels in Triton's interpreter on the CPU
    torch._dynamo.reset()
    model = _model(backend).eval()
    g = torch.Generator().manual_seed(4)
    prompt = torch.randint(0, 256, (2, 13), generator=g)
    eager_cache, compiled_cache = model.new_cache(2, 40), model.new_cache(2, 40)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    frames = torch._dynamo.utils.counters["stats"]
    with torch.no_grad():
        torch.testing.assert_close(compiled(prompt, cache=compiled_cache)[0], model(prompt, cache=eager_cache)[0])
        start = frames["unique_graphs"]
        for _ in range(10 if backend == "reference" else 4):
            tokens = torch.randint(0, 256, (2, 1), generator=g)
            want = model(tokens, cache=eager_cache)[0]
            got = compiled(tokens, cache=compiled_cache)[0]
            torch.testing.assert_close(got, want)
            assert compiled_cache.host_seqlens == eager_cache.host_seqlens
            assert compiled_cache.cache_seqlens.tolist() == eager_cache.cache_seqlens.tolist()
            for a, b in zip(compiled_cache.layers, eager_cache.layers):
                assert a.ring_start == b.ring_start
                torch.testing.assert_close(a.k_cmp, b.k_cmp)
    assert 1 <= frames["unique_graphs"] - start <= 4  # not one graph per step


def test_ops_fullgraph_with_kernel_options():
    """kernel_options travel to the ops as a string made when the KernelOptions is built: nothing to trace."""
    torch._dynamo.reset()
    opts = nsa.KernelOptions(selected_fwd=nsa.Launch(num_warps=2))
    g = torch.Generator().manual_seed(5)
    q, k_cmp = torch.randn(1, 20, 4, 8, generator=g), torch.randn(1, CFG.num_cmp_tokens(20), 2, 8, generator=g)

    def select(q, k_cmp):
        return nsa.select_blocks(q, k_cmp, CFG, backend="reference", kernel_options=opts)

    torch.testing.assert_close(torch.compile(select, backend="aot_eager", fullgraph=True)(q, k_cmp), select(q, k_cmp))


def test_triton_op_fullgraph_forward_backward_interpreter():
    """The Triton training op (here in Triton's interpreter) under fullgraph: the same output and gradients."""
    pytest.importorskip("triton")
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(6)
    B, T, HQ, HKV, D = 1, 24, 4, 2, 8
    tc = CFG.num_cmp_tokens(T)
    xs = [torch.randn(B, T, HQ, D, generator=g), torch.randn(B, tc, HKV, D, generator=g),
          torch.randn(B, tc, HKV, D, generator=g)] + [torch.randn(B, T, HKV, D, generator=g) for _ in range(4)] + \
        [torch.rand(B, T, HQ, 3, generator=g)]
    xs = [x.requires_grad_() for x in xs]

    def attention(*xs):
        return nsa.nsa_attention(*xs, CFG, backend="triton")

    want = attention(*xs)
    want_grads = torch.autograd.grad(want.square().sum(), xs)
    got = torch.compile(attention, backend="aot_eager", fullgraph=True)(*xs)
    grads = torch.autograd.grad(got.square().sum(), xs)
    torch.testing.assert_close(got, want)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b)


def test_packed_batch_refused_by_fullgraph():
    """The documented limit: cu_seqlens.tolist() (its checks, the packed lengths) cannot be traced: Dynamo refuses
    the data-dependent checks (torch 2.13: a UserError) or breaks the graph there (Unsupported under fullgraph)."""
    torch._dynamo.reset()
    model = _model()
    idx = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(7))
    cu = torch.tensor([0, 15, 40], dtype=torch.int32)
    with pytest.raises((torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError)):
        torch.compile(model, backend="aot_eager", fullgraph=True)(idx, cu_seqlens=cu)


@pytest.mark.gpu
def test_gpu_inductor_training_step_matches_eager():
    """The model's training step compiled by inductor (fullgraph, Triton backend, float32 on a GPU): loss and every
    gradient as eager's, to float32 rounding (inductor fuses the glue around the ops and sums in its own order).
    backend=None, as users leave it: the backend choice is traced too."""
    torch._dynamo.reset()
    model = _model(backend=None).cuda()
    g = torch.Generator().manual_seed(7)
    idx, targets = (torch.randint(0, 256, (2, 200), generator=g).cuda() for _ in range(2))
    logits, loss, grads = _loss_and_grads(model, model, idx, targets)
    compiled = torch.compile(model, fullgraph=True)
    c_logits, c_loss, c_grads = _loss_and_grads(model, compiled, idx, targets)
    torch.testing.assert_close(c_loss, loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c_logits, logits, rtol=1e-4, atol=1e-4)
    for name in grads:
        torch.testing.assert_close(c_grads[name], grads[name], rtol=1e-3, atol=1e-5, msg=name)
