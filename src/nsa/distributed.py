"""Context parallelism for NSA over torch.distributed (NCCL on GPUs, gloo on CPUs).

Each rank of a context-parallel (CP) group holds a shard of every sequence's tokens: its queries, and the raw
keys/values of the same tokens. The keys and values (raw and compressed) are all-gathered across the group (with
GQA they are a small fraction of the queries' size; an all-gather fits NSA better than ring attention because the
selected blocks may sit anywhere in the past), each rank runs the suffix-query op (nsa_attention with Tk >= Tq) for
its own query chunks against the keys before them, and the key/value gradients are reduce-scattered back to
their owners in the backward: one all-gather and one reduce-scatter per call, in one autograd node.

Causal load balance. Every sequence is cut into 2W chunks (W ranks; chunk c covers [c*n // 2W, (c+1)*n // 2W),
so lengths need not divide by anything); rank r holds chunks r and 2W-1-r, an early and a late one, so that all
ranks get about the same causal work. Compressed token i belongs to the rank holding its last raw token
i*d + l - 1. Dense batches [B, T] are split the same way in every row.

Exactness. A rank's query chunk c is the suffix of the key prefix [0, end of c): the suffix-query op gives
exactly the rows of the single-process op, computed from the same keys; the results agree with the single-process
op to float tolerance, not bitwise: the query chunks and tiles start at other rows (sums in another order) and the
key/value gradients are sums over ranks (in float32, float64 for float64 inputs, then cast to the inputs' dtype).

Memory per rank (K = bytes of one token's raw K/V tensors gathered, L = tokens of the whole batch, W ranks):
  forward: the gathered K/V, L * K (freed after the call), and the key prefixes of the rank's two chunks,
    about (1 + 1/(2W)) * L * K (saved for the backward), plus the op's own work for the L / W local queries;
  backward: the prefixes' gradients and the shard-ordered sum, about 2 * L * K more, transiently.
  So about 3 * L * K + A(L / W), A(n) being the single-GPU op's memory for n queries; with GQA (Hkv << Hq) the
  L * K terms are small next to A. The layer (nsa.layer) also gathers phi's raw input and computes every
  compressed token on every rank (phi's activations, about 2 * l/d * L * Hkv * D, on each rank).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .config import NSAConfig
from .ops import _resolve_backend, library
from .ops.checks import check_scale
from .ops.types import check_kernel_options

__all__ = ["ContextParallelLayout", "shard", "shard_compressed", "unshard", "context_parallel_attention"]

# torch >= 2.13 names them *_single (the *_tensor names warn there); older versions have only the *_tensor ones
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def host_to_device(x: torch.Tensor, device) -> torch.Tensor:
    """A host tensor copied to `device` without waiting for it (CUDA: through pinned memory, non-blocking; a copy
    from pageable memory synchronizes the stream)."""
    device = torch.device(device)
    if device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def _chunk_bounds(n: int, chunks: int) -> list[int]:
    return [c * n // chunks for c in range(chunks + 1)]


def _ranges(pieces) -> torch.Tensor:
    """cat of arange(a, b) over (a, b) in pieces (long, on the CPU)."""
    pieces = [torch.arange(a, b) for a, b in pieces]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


class ContextParallelLayout:
    """Which tokens each rank of a context-parallel group holds, and the index maps of the gather (host side).

    Dense batches: seq_len (and batch), inputs [batch, seq_len, ...]; packed: seq_lens (the N lengths),
    inputs [1, sum(seq_lens), ...]. group: the CP process group (None: the default group); world_size and rank
    are read from it unless given (a layout for another rank can be built without a process group).
    Shapes of the local shards: tokens [B, local_len, ...] (B = batch, or 1 when packed) and compressed tokens
    [B, local_cmp_len, ...].
    """

    def __init__(self, config: NSAConfig, *, seq_len: int | None = None, batch: int = 1,
                 seq_lens: list[int] | None = None, group=None, world_size: int | None = None,
                 rank: int | None = None):
        if not isinstance(config, NSAConfig):
            raise TypeError(f"config must be an nsa.NSAConfig, got {type(config).__name__}")
        if (seq_len is None) == (seq_lens is None):
            raise ValueError("pass exactly one of seq_len (dense [batch, seq_len] inputs) or seq_lens (packed "
                             "sequences)")
        if seq_lens is not None:
            if batch != 1:
                raise ValueError(f"packed sequences (seq_lens) come as one row [1, total, ...]: batch must be 1, "
                                 f"got {batch}")
            if not seq_lens or any(not isinstance(n, int) or n < 0 for n in seq_lens):
                raise ValueError(f"seq_lens must be a non-empty list of ints >= 0, got {seq_lens!r}")
        elif not (isinstance(seq_len, int) and seq_len >= 1 and isinstance(batch, int) and batch >= 1):
            raise ValueError(f"seq_len and batch must be ints >= 1, got {seq_len!r} and {batch!r}")
        if world_size is None:
            world_size = dist.get_world_size(group)
        if rank is None:
            rank = dist.get_rank(group)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size = {world_size}), got {rank}")
        self.config, self.group, self.world_size, self.rank = config, group, world_size, rank
        self.dense = seq_lens is None
        self.batch = batch
        self.seq_lens = [seq_len] * batch if self.dense else list(seq_lens)
        self._build()
        self._device_cache: dict = {}

    def _build(self) -> None:
        W, num_cmp = self.world_size, self.config.num_cmp_tokens
        offsets, cmp_offsets = [0], [0]
        for n in self.seq_lens:
            offsets.append(offsets[-1] + n)
            cmp_offsets.append(cmp_offsets[-1] + num_cmp(n))
        self.total, self.total_cmp = offsets[-1], cmp_offsets[-1]
        bounds = [_chunk_bounds(n, 2 * W) for n in self.seq_lens]
        cmp_bounds = [[num_cmp(b) for b in bs] for bs in bounds]  # compressed tokens ending in each chunk

        def held(r, starts, bs):  # rank r's rows: per sequence, chunk r then chunk 2W-1-r
            return [(o + b[c], o + b[c + 1]) for o, b in zip(starts, bs) for c in (r, 2 * W - 1 - r)]

        raw_rows = [_ranges(held(r, offsets, bounds)) for r in range(W)]
        cmp_rows = [_ranges(held(r, cmp_offsets, cmp_bounds)) for r in range(W)]
        self.raw_pad = max(len(x) for x in raw_rows)
        self.cmp_pad = max(len(x) for x in cmp_rows)
        # slot of every global row in the gathered buffer: owner * pad + row among the owner's rows
        self._raw_slot = self._slots(raw_rows, self.total, self.raw_pad)
        self._cmp_slot = self._slots(cmp_rows, self.total_cmp, self.cmp_pad)
        r = self.rank
        self.local_rows, self.local_cmp_rows = raw_rows[r], cmp_rows[r]
        # the rank's query pieces (2 per sequence) and the key prefix each one needs (none for an empty piece)
        self.query_lens = [b[c + 1] - b[c] for b in bounds for c in (r, 2 * W - 1 - r)]
        self.key_lens = [b[c + 1] if b[c + 1] > b[c] else 0 for b in bounds for c in (r, 2 * W - 1 - r)]
        starts = [o for o in offsets[:-1] for _ in range(2)]
        cmp_starts = [o for o in cmp_offsets[:-1] for _ in range(2)]
        self._prefix_rows = _ranges((o, o + k) for o, k in zip(starts, self.key_lens))
        self._cmp_prefix_rows = _ranges((o, o + num_cmp(k)) for o, k in zip(cmp_starts, self.key_lens))
        positions = [_ranges([(b[c], b[c + 1]) for c in (r, 2 * W - 1 - r)]) for b in bounds]
        self._positions = positions[0] if self.dense else torch.cat(positions)

    @staticmethod
    def _slots(rows_of_rank, total: int, pad: int) -> torch.Tensor:
        slot = torch.empty(total, dtype=torch.long)
        for r, rows in enumerate(rows_of_rank):
            slot[rows] = r * pad + torch.arange(len(rows))
        return slot

    @property
    def local_len(self) -> int:
        """Tokens of one batch row held by this rank."""
        return len(self.local_rows) // self.batch

    @property
    def local_cmp_len(self) -> int:
        """Compressed tokens of one batch row owned by this rank."""
        return len(self.local_cmp_rows) // self.batch

    def tensors(self, device) -> dict:
        """On `device` (made once per device): the gather's slots of the rank's key prefixes (prefix_slots,
        cmp_prefix_slots) and of the whole batch in order (full_slots); cmp_prefix_rows, the prefixes' compressed
        tokens among the whole batch's; the rank's rows (local_rows, local_cmp_rows) and their positions in their
        sequences; the pieces' cu_seqlens of queries (cu_q) and keys (cu_k)."""
        device = torch.device(device)
        if device not in self._device_cache:
            def cu(lens):
                return torch.tensor([0] + lens).cumsum(0).to(torch.int32)
            host = dict(prefix_slots=self._raw_slot[self._prefix_rows],
                        cmp_prefix_slots=self._cmp_slot[self._cmp_prefix_rows], full_slots=self._raw_slot,
                        cmp_prefix_rows=self._cmp_prefix_rows, local_rows=self.local_rows,
                        local_cmp_rows=self.local_cmp_rows, positions=self._positions, cu_q=cu(self.query_lens),
                        cu_k=cu(self.key_lens))
            self._device_cache[device] = {k: host_to_device(v, device) for k, v in host.items()}
        return self._device_cache[device]

    def to_packed(self, x: torch.Tensor) -> torch.Tensor:
        """[B, n, ...] -> [1, B * n, ...] (dense batches; packed ones are already so)."""
        return x.reshape(1, -1, *x.shape[2:]) if self.dense else x

    def from_packed(self, x: torch.Tensor) -> torch.Tensor:
        """[1, B * n, ...] -> [B, n, ...] (dense batches)."""
        return x.reshape(self.batch, -1, *x.shape[2:]) if self.dense else x

    def check_local(self, name: str, x: torch.Tensor, compressed: bool = False) -> None:
        """x is this rank's shard: [B, local_len (or local_cmp_len), ...]."""
        rows = self.local_cmp_len if compressed else self.local_len
        what = "compressed tokens" if compressed else "tokens"
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or tuple(x.shape[:2]) != (self.batch, rows):
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be this rank's shard [{self.batch}, {rows}, ...] ({what} of the layout; "
                             f"make it with nsa.distributed.{'shard_compressed' if compressed else 'shard'}), "
                             f"got {got}")


def shard(x: torch.Tensor, layout: ContextParallelLayout) -> torch.Tensor:
    """This rank's tokens of a whole batch x [B, T, ...] (packed: [1, total, ...]) -> [B, local_len, ...]."""
    if x.shape[:2] != (layout.batch, layout.total // layout.batch):
        raise ValueError(f"x must be the whole batch [{layout.batch}, {layout.total // layout.batch}, ...] of the "
                         f"layout, got {tuple(x.shape)}")
    return layout.from_packed(layout.to_packed(x)[:, layout.tensors(x.device)["local_rows"]])


def shard_compressed(x: torch.Tensor, layout: ContextParallelLayout) -> torch.Tensor:
    """This rank's compressed tokens of the whole batch's x [B, Tc, ...] -> [B, local_cmp_len, ...]."""
    if x.shape[:2] != (layout.batch, layout.total_cmp // layout.batch):
        raise ValueError(f"x must hold the whole batch's compressed tokens [{layout.batch}, "
                         f"{layout.total_cmp // layout.batch}, ...], got {tuple(x.shape)}")
    return layout.from_packed(layout.to_packed(x)[:, layout.tensors(x.device)["local_cmp_rows"]])


def _sum_dtype(dtype: torch.dtype) -> torch.dtype:
    """Gradients are summed over ranks in float32 (float64 stays float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _GatherRows(torch.autograd.Function):
    """All-gathers the rows of several local shards in one collective and returns, for each, the gathered rows
    at the given global-buffer slots; the backward sums the rows' gradients into the slots (index_add_: a slot
    gets at most two rows, added onto zero, which gives the same bits in any order) and reduce-scatters them (in
    float32, float64 for float64 inputs) back to their owners, in one collective.

    forward(group, pads, slots, *local): local[i] [1, n_i, ...] of a rank, pads[i] the largest n_i of the group,
    slots[i] long [m_i] into the gathered [W * pads[i]] rows -> outputs [1, m_i, ...].
    """

    @staticmethod
    def forward(ctx, group, pads, slots, *local):
        W = dist.get_world_size(group)
        widths = [math.prod(x.shape[2:]) for x in local]
        dtype = local[0].dtype
        send = torch.cat([torch.nn.functional.pad(x.reshape(x.shape[1], w), (0, 0, 0, p - x.shape[1])).flatten()
                          for x, w, p in zip(local, widths, pads)])
        recv = send.new_empty(W * send.numel())
        _all_gather(recv, send, group=group)
        parts = recv.view(W, -1).split([p * w for p, w in zip(pads, widths)], dim=1)
        ctx.group, ctx.pads, ctx.slots, ctx.widths, ctx.dtype = group, pads, slots, widths, dtype
        ctx.local_shapes = [x.shape for x in local]
        return tuple(part.reshape(W * p, w).index_select(0, s).view(1, len(s), *x.shape[2:])
                     for part, p, w, s, x in zip(parts, pads, widths, slots, local))

    @staticmethod
    def backward(ctx, *grads):
        W = dist.get_world_size(ctx.group)
        sums = []
        for g, p, w, s in zip(grads, ctx.pads, ctx.widths, ctx.slots):
            total = torch.zeros(W * p, w, dtype=_sum_dtype(ctx.dtype), device=s.device)
            if g is not None:
                total.index_add_(0, s, g.reshape(len(s), w).to(total.dtype))
            sums.append(total.view(W, p * w))
        send = torch.cat(sums, dim=1).flatten()
        recv = send.new_empty(send.numel() // W)
        _reduce_scatter(recv, send, group=ctx.group)
        mine = recv.split([p * w for p, w in zip(ctx.pads, ctx.widths)])
        local = tuple(m.view(p, w)[:shape[1]].reshape(shape).to(ctx.dtype)
                      for m, p, w, shape in zip(mine, ctx.pads, ctx.widths, ctx.local_shapes))
        return (None, None, None) + local


def gather_rows(tensors: list[torch.Tensor], slot_names: list[str],
                layout: ContextParallelLayout) -> tuple[torch.Tensor, ...]:
    """Local shards [B, local_len or local_cmp_len, ...] -> the group's rows at the layout's slots `slot_names`
    ("prefix_slots" or "full_slots" for tokens, "cmp_prefix_slots" for compressed ones), each [1, rows, ...]; one
    all-gather, one reduce-scatter in the backward. Every tensor must share one dtype."""
    dtypes = {x.dtype for x in tensors}
    if len(dtypes) != 1:
        raise TypeError(f"the gathered tensors must share one dtype, got {sorted(map(str, dtypes))}")
    t = layout.tensors(tensors[0].device)
    pads = [layout.cmp_pad if name.startswith("cmp_") else layout.raw_pad for name in slot_names]
    return _GatherRows.apply(layout.group, pads, [t[name] for name in slot_names],
                             *(layout.to_packed(x) for x in tensors))


def unshard(x: torch.Tensor, layout: ContextParallelLayout) -> torch.Tensor:
    """The whole batch [B, T, ...] (packed [1, total, ...]) from every rank's shard x [B, local_len, ...]
    (a collective: every rank of the group calls it; differentiable)."""
    layout.check_local("x", x)
    return layout.from_packed(gather_rows([x], ["full_slots"], layout)[0])


def attend_gathered(q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates, layout: ContextParallelLayout,
                    scale: float, backend: str, kernel_options=None) -> torch.Tensor:
    """The rank's queries (q [B, local_len, Hq, Dk], gates [B, local_len, Hq, 3]) against the key prefixes of its
    query pieces ([1, rows, Hkv, D] at the layout's "prefix_slots" / "cmp_prefix_slots"): the suffix-query op on
    a packed batch of 2 pieces per sequence, with the layout's host lengths (no host read). -> o [B, local_len,
    Hq, Dv]."""
    t = layout.tensors(q.device)
    o = library.nsa_attention(layout.to_packed(q), k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, layout.to_packed(gates),
                              layout.config, scale, backend, t["cu_q"], layout.query_lens, kernel_options, t["cu_k"],
                              layout.key_lens)
    return layout.from_packed(o)


def context_parallel_attention(q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates, layout: ContextParallelLayout,
                               *, scale=None, backend=None, kernel_options=None) -> torch.Tensor:
    """nsa_attention under context parallelism: every rank of layout.group calls it with its shards.

    q [B, local_len, Hq, Dk], k_slc, v_slc, k_swa, v_swa [B, local_len, Hkv, Dk or Dv], gates [B, local_len, Hq, 3]
    (nsa.distributed.shard of the whole batch's), k_cmp, v_cmp [B, local_cmp_len, Hkv, Dk or Dv] (shard_compressed).
    Returns this rank's o [B, local_len, Hq, Dv]; unshard() puts the whole batch's back together. The six
    key/value inputs are gathered in one collective (k_swa, v_swa once when they are k_slc, v_slc).
    """
    for name, x in (("q", q), ("k_slc", k_slc), ("v_slc", v_slc), ("k_swa", k_swa), ("v_swa", v_swa),
                    ("gates", gates)):
        layout.check_local(name, x)
    for name, x in (("k_cmp", k_cmp), ("v_cmp", v_cmp)):
        layout.check_local(name, x, compressed=True)
    scale = check_scale(scale, q.shape[-1])
    options = check_kernel_options(kernel_options)
    backend = _resolve_backend(backend, q.device)
    shared = k_swa is k_slc and v_swa is v_slc
    raw = [k_slc, v_slc] if shared else [k_slc, v_slc, k_swa, v_swa]
    gathered = gather_rows([k_cmp, v_cmp, *raw], ["cmp_prefix_slots"] * 2 + ["prefix_slots"] * len(raw), layout)
    keys = gathered if not shared else gathered + gathered[2:]
    return attend_gathered(q, *keys, gates, layout, scale, backend, options)
