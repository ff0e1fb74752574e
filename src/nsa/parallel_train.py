"""How `nsa train` spreads a step over processes: one process, or DDP / FSDP2 over the torchrun world, optionally
with context parallelism (nsa.distributed); checkpoints through torch.distributed.checkpoint (DCP).

Process groups. torchrun starts WORLD_SIZE processes (RANK, LOCAL_RANK, MASTER_ADDR/PORT or a rendezvous
endpoint in the environment). They form a device mesh (dp, cp) of D x C ranks, C = train.context_parallel:
  cp (C consecutive ranks: one node as long as C <= GPUs per node): every NSA layer's all-gather of the keys and
    values and the reduce-scatter of their gradients;
  the whole world (dp x cp): DDP's gradient all-reduce, or FSDP2's parameter all-gathers and gradient
    reduce-scatters (parameters are replicated over cp as over dp: each rank's gradients hold its own queries'
    part), and the all-reduce of the logged loss.
The global batch is train.batch_size rows drawn alike on every rank (one generator, one seed): dp rank d takes rows
[d B / D, (d + 1) B / D) (packed batches: those windows), cp rank c its chunks of them. Each rank's loss is its
tokens' summed cross-entropy over the whole batch's count of targets, so the sum over ranks is the batch's mean
loss; backward runs on it times the world size, since DDP and FSDP2 average gradients. The loss curve is that of
one process on the same batch (to float tolerance: the sums run in another order).

Checkpoints: a folder (DCP: each rank writes its shards; loading reshards, so a run resumes on another world size
or another D x C split), with the step, the data sampler's state and the configs in meta.json.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .distributed import ContextParallelLayout, host_to_device, shard

PARALLEL_MODES = ("none", "ddp", "fsdp")
META_FILE = "meta.json"


class TrainParallelism:
    """The step's layout over processes: mode "none" (one process), "ddp" or "fsdp"; context_parallel C >= 1."""

    def __init__(self, mode: str, context_parallel: int, device: torch.device):
        if mode not in PARALLEL_MODES:
            raise ValueError(f"train.parallel must be one of {PARALLEL_MODES}, got {mode!r}")
        self.mode, self.device = mode, device
        if mode == "none":
            if context_parallel != 1:
                raise ValueError("train.context_parallel > 1 needs train.parallel='ddp' or 'fsdp' under torchrun")
            self.world, self.rank, self.cp, self.cp_group, self.mesh, self.world_mesh = 1, 0, 1, None, None, None
            return
        if not dist.is_initialized():
            if "WORLD_SIZE" not in os.environ:
                raise ValueError(f"train.parallel={mode!r} runs under torchrun (torchrun --nproc-per-node N -m nsa "
                                 "train ...); one process takes train.parallel='none'")
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        if context_parallel < 1 or self.world % context_parallel:
            raise ValueError(f"train.context_parallel ({context_parallel}) must divide the world size ({self.world})")
        from torch.distributed.device_mesh import init_device_mesh
        self.cp = context_parallel
        self.mesh = init_device_mesh(device.type, (self.world // self.cp, self.cp), mesh_dim_names=("dp", "cp"))
        self.cp_group = self.mesh.get_group("cp")
        self.world_mesh = init_device_mesh(device.type, (self.world,))  # FSDP2 shards over dp and cp alike

    @property
    def distributed(self) -> bool:
        return self.mode != "none"

    @property
    def is_main(self) -> bool:
        """The rank that writes the metrics, the configs and the checkpoint's meta.json."""
        return self.rank == 0

    @property
    def dp(self) -> int:
        return self.world // self.cp

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP over the world, or FSDP2 (fully_shard per block, then the whole model); the model itself else."""
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel
            ids = [self.device.index] if self.device.type == "cuda" else None
            return DistributedDataParallel(model, device_ids=ids)
        if self.mode == "fsdp":
            from torch.distributed.fsdp import fully_shard
            for block in model.blocks:
                fully_shard(block, mesh=self.world_mesh)
            fully_shard(model, mesh=self.world_mesh)
        return model

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size % self.dp:
            raise ValueError(f"train.batch_size ({batch_size}) must divide by the data-parallel size "
                             f"{self.dp} (world {self.world} / context_parallel {self.cp})")

    def _my_rows(self, x, y, cu, seq_len: int):
        """The dp rank's rows of the global batch (dense [B, T]; packed [1, B*T] with cu_seqlens on the host)."""
        d, D = self.rank // self.cp, self.dp
        if cu is None:
            rows = x.shape[0] // D
            return x[d * rows:(d + 1) * rows], y[d * rows:(d + 1) * rows], None
        tokens = x.shape[1] // D  # whole windows: cu_seqlens holds every window boundary
        lo, hi = d * tokens, (d + 1) * tokens
        offsets = [o - lo for o in cu.tolist() if lo <= o <= hi]
        return x[:, lo:hi], y[:, lo:hi], offsets

    def loss(self, model: nn.Module, batch: tuple, seq_len: int, weights: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(what to call backward on, this rank's share of the batch's mean loss) of a global batch (x, y) or
        (x, y, cu_seqlens) on the host. The shares' sum over the ranks is the batch's mean loss (with weights, float
        of y's shape and 0 on ignored targets, its weighted mean: LanguageModel's loss_weights)."""
        x, y, cu = batch if len(batch) == 3 else (*batch, None)
        if not self.distributed:
            args = (x.to(self.device), y.to(self.device)) + (() if cu is None else (cu.to(self.device),))
            loss = model(*args, loss_weights=None if weights is None else weights.to(self.device))[1]
            return loss, loss
        if weights is None:
            weights = (y != -100).float()
        total = weights.sum().item()  # the whole batch's weight, summed on the host (a host tensor)
        _, weights, _ = self._my_rows(x, weights, cu, seq_len)
        x, y, offsets = self._my_rows(x, y, cu, seq_len)
        if self.cp > 1:
            lens = None if offsets is None else [b - a for a, b in zip(offsets[:-1], offsets[1:])]
            layout = ContextParallelLayout(model_config(model).nsa, seq_len=None if lens else x.shape[1],
                                           batch=1 if lens else x.shape[0], seq_lens=lens, group=self.cp_group)
            x, y, weights = (host_to_device(shard(t, layout), self.device) for t in (x, y, weights))
            logits = model(x, context_parallel=layout)[0]
        else:
            cu_local = None if offsets is None else host_to_device(torch.tensor(offsets, dtype=torch.int32),
                                                                   self.device)
            logits = model(host_to_device(x, self.device), cu_seqlens=cu_local)[0]
            y, weights = host_to_device(y, self.device), host_to_device(weights, self.device)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none")  # 0 on ignored targets
        share = (weights.flatten() * ce).sum() / max(total, 1e-30)
        return share * self.world, share

    def global_loss(self, share: torch.Tensor) -> float:
        """The batch's mean loss from every rank's share (an all-reduce; a host read)."""
        if self.distributed:
            share = share.detach().clone()
            dist.all_reduce(share)
        return share.item()

    # --- checkpoints (DCP) ---

    def save(self, path: Path, model, optimizer, step: int, generator: torch.Generator, config: dict) -> None:
        """Writes the checkpoint folder `path` (via a temporary folder, renamed once every rank has written)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        tmp = path.with_name(path.name + ".tmp")
        if self.is_main and tmp.exists():
            shutil.rmtree(tmp)
        dist.barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        if self.is_main:
            meta = {"step": step, "generator": generator.get_state().tolist(), "config": config}
            (tmp / META_FILE).write_text(json.dumps(meta))
            if path.exists():
                shutil.rmtree(path)
            tmp.rename(path)
        dist.barrier()

    def load(self, path: Path, model, optimizer, generator: torch.Generator) -> int:
        """Restores model, optimizer and the data sampler from the checkpoint folder (any world size); the step."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        meta = read_meta(path)
        generator.set_state(torch.tensor(meta["generator"], dtype=torch.uint8))
        return meta["step"]


def read_meta(path: Path) -> dict:
    """The step, sampler state and configs of a DCP checkpoint folder."""
    meta = Path(path) / META_FILE
    if not meta.exists():
        raise FileNotFoundError(f"{meta} does not exist: is {path} a checkpoint folder of a distributed run?")
    return json.loads(meta.read_text())


def model_config(model: nn.Module):
    """The ModelConfig of a LanguageModel, wrapped by DDP or not."""
    return getattr(model, "module", model).cfg
