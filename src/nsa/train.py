"""A plain training loop: AdamW, warmup then cosine (or constant) learning rate, gradient clipping.

Several models can be trained in lockstep: at every step they all see the very same batch, and they
are all evaluated on the same fixed validation windows, so their loss curves compare like for like.
On CUDA the forward passes run under bfloat16 autocast (weights and optimizer state stay float32).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .data import Corpus, get_batch

SCHEDULES = ("cosine", "constant")


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at the last step
    warmup_steps: int = 20
    schedule: str = "cosine"  # or "constant" (after warmup)
    weight_decay: float = 0.1  # on matrices only, not on norms and biases
    grad_clip: float = 1.0  # max global gradient norm
    eval_every: int = 50
    eval_batches: int = 4
    seed: int = 0

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"TrainConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class History:
    steps: list[int] = field(default_factory=list)  # step i: the loss of batch i, before update i + 1
    train_loss: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)  # after this many updates
    val_loss: list[float] = field(default_factory=list)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over warmup_steps, then constant or cosine from lr down to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - 1 - cfg.warmup_steps)
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + (cfg.lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def autocast(device: str | torch.device) -> torch.autocast:
    """bfloat16 autocast on CUDA (tensor cores), a no-op elsewhere."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean loss of model over the given (x, y) batches."""
    model.eval()
    with autocast(batches[0][0].device):
        loss = sum(model(x, y)[1].item() for x, y in batches) / len(batches)
    model.train()
    return loss


def train(models: dict[str, nn.Module], corpus: Corpus, cfg: TrainConfig, device: str | torch.device = "cpu",
          progress: bool = True) -> dict[str, History]:
    """Trains every model (forward(idx, targets) -> (logits, loss)) for cfg.steps steps on identical batches.

    Validation loss is measured before training, every cfg.eval_every steps and after the last step.
    Returns one History per model name.
    """
    generator = torch.Generator().manual_seed(cfg.seed)
    val_generator = torch.Generator().manual_seed(cfg.seed + 1)
    val_batches = [get_batch(corpus.val, cfg.batch_size, cfg.seq_len, val_generator, device)
                   for _ in range(cfg.eval_batches)]
    optimizers = {name: make_optimizer(model, cfg) for name, model in models.items()}
    history = {name: History() for name in models}

    def record_val(step: int) -> None:
        for name, model in models.items():
            history[name].val_steps.append(step)
            history[name].val_loss.append(evaluate(model, val_batches))

    record_val(0)
    steps = _progress_bar(cfg.steps, "training " + " & ".join(models)) if progress else range(cfg.steps)
    for step in steps:
        x, y = get_batch(corpus.train, cfg.batch_size, cfg.seq_len, generator, device)
        for name, model in models.items():
            opt = optimizers[name]
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            with autocast(device):
                loss = model(x, y)[1]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            history[name].steps.append(step)
            history[name].train_loss.append(loss.item())
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            record_val(step + 1)
        if progress:
            steps.set_postfix({f"{name} loss": f"{h.train_loss[-1]:.3f}" for name, h in history.items()})
    return history


def _progress_bar(total: int, desc: str):
    """A tqdm bar over range(total); tqdm is an optional dependency (the `cli` extra)."""
    try:
        from tqdm.auto import tqdm
    except ImportError as e:
        raise ModuleNotFoundError('train(progress=True) needs tqdm: pip install "nsa[cli]" '
                                  "(or pass progress=False)") from e
    return tqdm(range(total), desc=desc)
