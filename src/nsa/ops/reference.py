"""The reference backend: SPEC.md's equations in plain PyTorch.

Exact in float64, differentiable by autograd, vectorized over batch, heads and tokens, and chunked
over queries so that no [T, T] tensor ever exists: a chunk of C queries holds C x Tc compressed
scores, C x n*l' gathered keys and C x (C + w) window scores.
Half-precision inputs are computed in float32 and the result cast back.

Layout inside this file: [B, Hkv, G, T, D] for queries (head h = kv_head * G + j, so h // G is
the key/value head), [B, Hkv, T, D] for keys and values.
"""
from __future__ import annotations

import torch

from ..config import NSAConfig
from .checks import cmp_seqlens

QUERY_CHUNK = 128  # queries processed at once; bounds memory, does not change results


def cmp_slc_overlap(num_cmp: int, num_blocks: int, config: NSAConfig, device=None,
                    dtype=torch.float64) -> torch.Tensor:
    """W [Tc, Nb]: W[i, j] = |[i*d, i*d + l) ∩ [j*l', (j+1)*l')| / d (the paper's equation 9)."""
    d, l, lp = config.cmp_stride, config.cmp_block, config.slc_block
    i = torch.arange(num_cmp, device=device)[:, None]
    j = torch.arange(num_blocks, device=device)[None, :]
    overlap = torch.minimum(i * d + l, (j + 1) * lp) - torch.maximum(i * d, j * lp)
    return overlap.clamp(min=0).to(dtype) / d


def _masked_softmax(scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim restricted to `visible`; rows with nothing visible give all zeros.

    Masked scores get the dtype's most negative finite value instead of -inf so that an empty row
    yields zeros (not NaN) and a zero gradient.
    """
    scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1).masked_fill(~visible, 0.0)


def _cmp_attention(q, k_cmp, v_cmp, t, config, scale):
    """Branch 1 for a chunk of queries at positions t [C].

    q [B, Hkv, G, C, Dk], k_cmp [B, Hkv, Tc, Dk], v_cmp [B, Hkv, Tc, Dv] (v_cmp may be None)
    -> p_cmp [B, Hkv, G, C, Tc], o_cmp [B, Hkv, G, C, Dv] (None without v_cmp).
    """
    i = torch.arange(k_cmp.shape[2], device=q.device)
    visible = i[None, :] * config.cmp_stride + config.cmp_block - 1 <= t[:, None]  # C(t): [C, Tc]
    p = _masked_softmax(scale * torch.einsum("bhgcd,bhnd->bhgcn", q, k_cmp), visible)
    o = None if v_cmp is None else torch.einsum("bhgcn,bhnd->bhgcd", p, v_cmp)
    return p, o


def _select(p_cmp, t, seq_len, config):
    """Top-n selection for a chunk of queries at positions t [C].

    p_cmp [B, Hkv, G, C, Tc] -> block ids [B, Hkv, C, n], ascending, -1 in unused slots.
    """
    lp, n = config.slc_block, config.num_selected
    num_blocks = config.num_slc_blocks(seq_len)
    W = cmp_slc_overlap(p_cmp.shape[-1], num_blocks, config, p_cmp.device, p_cmp.dtype)
    score = p_cmp.sum(dim=2) @ W  # group score P: p_slc summed over the G heads of a group
    j = torch.arange(num_blocks, device=t.device)[None, :]
    last = (t // lp)[:, None]  # J(t)
    # Forced blocks outrank every score; should n < 3 leave room for fewer than all of them,
    # the current block J(t) goes first, then J(t) - 1, then block 0.
    big = torch.finfo(score.dtype).max
    score = score.masked_fill(j > last, float("-inf"))
    score = score.masked_fill(j == 0, big / 2).masked_fill(j == last - 1, big).masked_fill(j == last, float("inf"))
    top, ids = score.topk(min(n, num_blocks), dim=-1)
    ids = ids.masked_fill(top == float("-inf"), num_blocks).sort(dim=-1).values
    ids = ids.masked_fill(ids == num_blocks, -1)
    return torch.nn.functional.pad(ids, (0, n - ids.shape[-1]), value=-1)


def cmp_attention_weights(q, k_cmp, positions, config, scale):
    """Branch 1's attention weights p_cmp of queries q [B, C, Hq, Dk] at positions long [C] over the compressed
    tokens k_cmp [B, Tc, Hkv, Dk] -> [B, C, Hq, Tc] in float32 (float64 for float64 inputs), 0 where unseen."""
    Hq, Hkv = q.shape[2], k_cmp.shape[2]
    ct = _compute_dtype(q.dtype)
    qh = _heads_first(q.to(ct)).unflatten(1, (Hkv, Hq // Hkv))  # [B, Hkv, G, C, Dk]
    p, _ = _cmp_attention(qh, _heads_first(k_cmp.to(ct)), None, positions.to(q.device), config, scale)
    return p.flatten(1, 2).transpose(1, 2)  # [B, Hkv, G, C, Tc] -> [B, C, Hq, Tc]


def _slc_attention(q, k_slc, v_slc, ids, t, config, scale):
    """Branch 2: q [B, Hkv, G, C, Dk] attends to the raw tokens u <= t of its group's blocks ids [B, Hkv, C, n]."""
    B, Hkv, G, C, _ = q.shape
    T = k_slc.shape[2]
    lp = config.slc_block
    tok = (ids[..., None] * lp + torch.arange(lp, device=q.device)).flatten(-2)  # [B, Hkv, C, n*l']
    visible = (tok >= 0) & (tok <= t[:, None])  # ids = -1 gives tok < 0; u <= t keeps causality
    flat = tok.clamp(0, T - 1).flatten(-2)[..., None]
    k = torch.gather(k_slc, 2, flat.expand(-1, -1, -1, k_slc.shape[-1])).unflatten(2, (C, -1))
    v = torch.gather(v_slc, 2, flat.expand(-1, -1, -1, v_slc.shape[-1])).unflatten(2, (C, -1))
    p = _masked_softmax(scale * torch.einsum("bhgcd,bhcsd->bhgcs", q, k), visible[:, :, None])
    return torch.einsum("bhgcs,bhcsd->bhgcd", p, v)


def _swa_attention(q, k_swa, v_swa, t, config, scale):
    """Branch 3: query t attends to u in [t - w + 1, t]; only the keys the chunk can reach are sliced."""
    lo = max(0, int(t[0]) - config.window + 1)
    hi = int(t[-1]) + 1
    u = torch.arange(lo, hi, device=q.device)
    visible = (u[None, :] <= t[:, None]) & (u[None, :] > t[:, None] - config.window)
    scores = scale * torch.einsum("bhgcd,bhnd->bhgcn", q, k_swa[:, :, lo:hi])
    return torch.einsum("bhgcn,bhnd->bhgcd", _masked_softmax(scores, visible), v_swa[:, :, lo:hi])


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)  # [B, T, H, D] -> [B, H, T, D]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunks(T: int, device):
    for start in range(0, T, QUERY_CHUNK):
        yield torch.arange(start, min(T, start + QUERY_CHUNK), device=device)


def _attention_dense(q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates, config, scale, start=0):
    """nsa_attention for one batch of equal-length sequences, [B, T, H, D] in, [B, T, Hq, Dv] out.

    The T queries sit at positions start .. start + T - 1 of the L >= start + T raw keys (start > 0
    when decoding: the queries are the newest tokens of a longer cached sequence).
    """
    B, T, Hq, Dk = q.shape
    L = k_slc.shape[1]
    Hkv = k_cmp.shape[2]
    ct = _compute_dtype(q.dtype)
    qh = _heads_first(q.to(ct)).unflatten(1, (Hkv, Hq // Hkv))  # [B, Hkv, G, T, Dk]
    gh = _heads_first(gates.to(ct)).unflatten(1, (Hkv, Hq // Hkv))  # [B, Hkv, G, T, 3]
    kc, vc, ks, vs, kw, vw = (_heads_first(x.to(ct)) for x in (k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa))
    outs = []
    for idx in _chunks(T, q.device):
        qc, gc, t = qh[:, :, :, idx], gh[:, :, :, idx], idx + start
        p_cmp, o_cmp = _cmp_attention(qc, kc, vc, t, config, scale)
        with torch.no_grad():  # the selection is discrete: no gradient flows through it
            ids = _select(p_cmp.detach(), t, L, config)
        o_slc = _slc_attention(qc, ks, vs, ids, t, config, scale)
        o_swa = _swa_attention(qc, kw, vw, t, config, scale)
        outs.append(gc[..., 0:1] * o_cmp + gc[..., 1:2] * o_slc + gc[..., 2:3] * o_swa)
    o = torch.cat(outs, dim=3)  # [B, Hkv, G, T, Dv]
    return o.flatten(1, 2).transpose(1, 2).to(q.dtype)


def _select_dense(q, k_cmp, config, scale):
    B, T, Hq, Dk = q.shape
    Hkv = k_cmp.shape[2]
    ct = _compute_dtype(q.dtype)
    qh = _heads_first(q.to(ct)).unflatten(1, (Hkv, Hq // Hkv))
    kc = _heads_first(k_cmp.to(ct))
    ids = [_select(_cmp_attention(qh[:, :, :, t], kc, None, t, config, scale)[0], t, T, config)
           for t in _chunks(T, q.device)]
    return torch.cat(ids, dim=2).transpose(1, 2)  # [B, T, Hkv, n]


def _split_packed(lens, tensors):
    """Yields, per sequence of nonzero lens[0], its slices of each group of packed [1, total, ...] tensors:
    tensors[i] is split by lens[i]."""
    starts = [0] * len(lens)
    for seq in zip(*lens):
        if seq[0]:
            yield [[x[:, s:s + n] for x in group] for group, s, n in zip(tensors, starts, seq)]
        starts = [s + n for s, n in zip(starts, seq)]


def nsa_attention(q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates, config, scale, seq_lens=None, seq_lens_k=None):
    """Reference NSA: inputs as in SPEC.md ([B, T, H, D], gates [B, T, Hq, 3]) -> o [B, T, Hq, Dv].

    The raw keys may be longer than the queries (k_slc [B, Tk, ...], Tk >= T): the queries are then the last T
    positions of the sequence (FlashAttention's bottom-right causal alignment).
    seq_lens: lengths of the packed query sequences when the batch is packed (B = 1), else None; seq_lens_k those of
    the keys (None: the same).
    """
    if seq_lens is None:
        return _attention_dense(q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates, config, scale,
                                start=k_slc.shape[1] - q.shape[1])
    key_lens = seq_lens if seq_lens_k is None else seq_lens_k
    outs = [_attention_dense(qs, kc, vc, ks, vs, kw, vw, gs, config, scale, start=ks.shape[1] - qs.shape[1])
            for (qs, gs), (ks, vs, kw, vw), (kc, vc) in
            _split_packed((seq_lens, key_lens, cmp_seqlens(key_lens, config)),
                          ((q, gates), (k_slc, v_slc, k_swa, v_swa), (k_cmp, v_cmp)))]
    return torch.cat(outs, dim=1)


@torch.no_grad()
def select_blocks(q, k_cmp, config, scale, seq_lens=None):
    """Reference block selection: q [B, T, Hq, Dk], k_cmp [B, Tc, Hkv, Dk] -> long [B, T, Hkv, n]."""
    if seq_lens is None:
        return _select_dense(q, k_cmp, config, scale)
    ids = [_select_dense(qs, kc, config, scale)
           for (qs,), (kc,) in _split_packed((seq_lens, cmp_seqlens(seq_lens, config)), ((q,), (k_cmp,)))]
    return torch.cat(ids, dim=1)


def nsa_decode(q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates, cache_seqlens, config, scale):
    """Reference decoding step: the S newest tokens of each cached row attend to everything before them.

    q [B, S, Hq, Dk], gates [B, S, Hq, 3]; cache buffers k_slc, v_slc, k_swa, v_swa [B, capacity, Hkv, D]
    and k_cmp, v_cmp [B, capacity_cmp, Hkv, D]; row b holds cache_seqlens[b] raw tokens (host ints, checked by
    the caller; the S new ones included, so its queries sit at positions cache_seqlens[b] - S ..
    cache_seqlens[b] - 1) and their num_cmp_tokens(cache_seqlens[b]) compressed tokens; the rest of each buffer
    is ignored.
    Returns o [B, S, Hq, Dv], equal to nsa_attention's rows at those positions.
    """
    S = q.shape[1]
    outs = []
    for b, L in enumerate(cache_seqlens):
        Tc = config.num_cmp_tokens(L)
        row = [x[b:b + 1, :L] for x in (k_slc, v_slc, k_swa, v_swa)]
        outs.append(_attention_dense(q[b:b + 1], k_cmp[b:b + 1, :Tc], v_cmp[b:b + 1, :Tc], *row, gates[b:b + 1],
                                     config, scale, start=L - S))
    return torch.cat(outs)
