"""A plain training loop: AdamW, warmup then cosine (or constant) learning rate, gradient clipping.

Several models can be trained in lockstep: at every step they all see the very same batch, and they
are all evaluated on the same fixed validation windows, so their loss curves compare like for like.
On CUDA the forward passes run under bfloat16 autocast (weights and optimizer state stay float32).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn

from .checkpoint import atomic_write, load_checkpoint, read_checkpoint, save_checkpoint
from .config import NSAConfig
from .data import DEFAULT_MAX_BYTES, Corpus, get_batch, get_packed_batch, load_corpus
from .eval import passkey_min_length
from .model import LanguageModel, ModelConfig, autocast
from .parallel_train import PARALLEL_MODES, TrainParallelism, read_meta

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
    # used by train_run (`nsa train`) only:
    checkpoint_every: int = 100  # and after the last step
    data: str | None = None  # a text file or folder, or "python-env" (nsa.data); None: the Python stdlib's .py files
    data_max_bytes: int = DEFAULT_MAX_BYTES
    packed: bool = False  # split windows at document (file) boundaries into packed sequences with cu_seqlens
    # the share of training windows (on average) that are passkey samples ending with the answer
    # (nsa.eval.passkey_windows); the validation windows stay plain text, comparable across runs
    passkey_fraction: float = 0.0
    # the loss weight of each answer byte of a passkey sample (the key's digits and '.'), a text byte's being 1:
    # > 1 puts more of the training signal on retrieval (the answer is 7 of a window's seq_len targets)
    passkey_answer_weight: float = 1.0
    # > 1: a passkey sample holds 1..passkey_needles needle-question-answer segments (each question asks for the
    # most recent key): more retrieval examples per window, at shorter distances
    passkey_needles: int = 1
    # several processes (under torchrun; nsa.parallel_train): "none", "ddp" or "fsdp" (FSDP2, fully_shard per
    # block), and the context-parallel group size (NSA attention only; it divides the world size)
    parallel: str = "none"
    context_parallel: int = 1

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"TrainConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.parallel not in PARALLEL_MODES:
            raise ValueError(f"TrainConfig.parallel must be one of {PARALLEL_MODES}, got {self.parallel!r}")
        if not isinstance(self.context_parallel, int) or self.context_parallel < 1:
            raise ValueError(f"TrainConfig.context_parallel must be an int >= 1, got {self.context_parallel!r}")
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches", "checkpoint_every",
                     "data_max_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.passkey_fraction <= 1:
            raise ValueError(f"TrainConfig.passkey_fraction must be in [0, 1], got {self.passkey_fraction}")
        if not self.passkey_answer_weight > 0:
            raise ValueError(f"TrainConfig.passkey_answer_weight must be > 0, got {self.passkey_answer_weight}")
        if self.passkey_needles < 1:
            raise ValueError(f"TrainConfig.passkey_needles must be >= 1, got {self.passkey_needles}")
        if self.passkey_fraction and self.seq_len + 1 < self.passkey_needles * passkey_min_length():
            raise ValueError(f"TrainConfig.seq_len ({self.seq_len}) is too short for the passkey mix: it needs "
                             f"seq_len >= {self.passkey_needles * passkey_min_length() - 1} with passkey_needles="
                             f"{self.passkey_needles}, or passkey_fraction=0")


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


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[tuple[torch.Tensor, ...]]) -> float:
    """Mean loss of model over the given (x, y) or packed (x, y, cu_seqlens) batches."""
    model.eval()
    with autocast(batches[0][0].device):
        loss = sum(model(*batch)[1].item() for batch in batches) / len(batches)
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


def _progress_bar(total: int, desc: str, start: int = 0, stop: int | None = None):
    """A tqdm bar over range(start, stop) out of total; tqdm is an optional dependency (the `cli` extra)."""
    try:
        from tqdm.auto import tqdm
    except ImportError as e:
        raise ModuleNotFoundError('train(progress=True) needs tqdm: pip install "nsa[cli]" '
                                  "(or pass progress=False)") from e
    return tqdm(range(start, total if stop is None else stop), desc=desc, total=total, initial=start)


# ---- one model, one run folder: `nsa train` ----

METRICS_FILE = "metrics.jsonl"  # one JSON object per line: step, loss, lr, tokens_per_s, and val_loss when evaluated
CHECKPOINT_FILE = "checkpoint.safetensors"  # the latest checkpoint, replaced atomically
DISTRIBUTED_CHECKPOINT = "checkpoint"  # a distributed run's: a torch.distributed.checkpoint folder
CONFIG_FILE = "config.json"  # the run's model and train configs (also inside every checkpoint)


def config_dict(model_cfg: ModelConfig, train_cfg: TrainConfig) -> dict:
    """{"model": ..., "train": ...}, JSON-serializable (the NSA block parameters nested under model.nsa)."""
    return {"model": asdict(model_cfg), "train": asdict(train_cfg)}


def configs_from_dict(config: dict):
    """The inverse of config_dict -> (ModelConfig, TrainConfig)."""
    return build_configs({"model": config["model"], "train": config.get("train", {})})


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl file (a run folder or the file itself); a cut last line is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (is it a run folder of `nsa train`?)")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a crash
    return records


def train_run(run_dir: str | os.PathLike, model_cfg: ModelConfig | None = None, train_cfg: TrainConfig | None = None, *,
              device: str | torch.device = "cpu", resume: bool = False, stop_at: int | None = None,
              progress: bool = True, corpus: Corpus | None = None) -> dict:
    """Trains one LanguageModel in the folder run_dir: metrics.jsonl, config.json and checkpoint.safetensors.

    Every step appends {"step", "loss", "lr", "tokens_per_s"} to metrics.jsonl ("step": updates done, "loss":
    the loss of that update's batch, weighted when train.passkey_answer_weight != 1); validation steps (0, every
    eval_every, the last) add "val_loss" (mean over eval_batches fixed validation windows, unweighted). A checkpoint is saved every checkpoint_every steps, after
    the last and at stop_at (a step to stop after, e.g. to split a run over sessions).
    resume=True continues run_dir from its checkpoint with the saved configs (model_cfg / train_cfg must be
    None): model, optimizer, the data sampler's position and the RNGs are restored, so the result is bitwise
    that of an uninterrupted run on the same device. Returns {"step", "loss", "val_loss", "run_dir", "checkpoint"}.
    Each step's batch is built on the host while the device runs the step before it (a passkey mix takes the host
    milliseconds); the one read of the loss per step is after that, so the host does not idle the device meanwhile.

    train.parallel "ddp" / "fsdp" (run under torchrun; nsa.parallel_train): every process calls train_run with the
    same arguments (device "cuda" means the process's LOCAL_RANK GPU); the global batch is split over the ranks,
    rank 0 writes the metrics and configs, and the checkpoint is a torch.distributed.checkpoint folder
    (DISTRIBUTED_CHECKPOINT), which resumes on any world size.
    """
    run_dir = Path(run_dir)
    distributed_ckpt = run_dir / DISTRIBUTED_CHECKPOINT
    if resume:
        if model_cfg is not None or train_cfg is not None:
            raise ValueError("resume=True continues with the run's saved configs; pass no model_cfg / train_cfg")
        saved = read_meta(distributed_ckpt)["config"] if distributed_ckpt.exists() else \
            read_checkpoint(run_dir / CHECKPOINT_FILE).config
        model_cfg, train_cfg = configs_from_dict(saved)
    else:
        if model_cfg is None or train_cfg is None:
            raise ValueError("a new run needs model_cfg and train_cfg")
        for path in (run_dir / CHECKPOINT_FILE, distributed_ckpt):
            if path.exists():
                raise ValueError(f"{run_dir} already holds a run ({path}); resume it or choose another folder")
    device = torch.device(device)
    if train_cfg.parallel != "none" and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    par = TrainParallelism(train_cfg.parallel, train_cfg.context_parallel, device)
    par.check_batch_size(train_cfg.batch_size)
    ckpt_path = distributed_ckpt if par.distributed else run_dir / CHECKPOINT_FILE
    config = config_dict(model_cfg, train_cfg)
    corpus = load_corpus(train_cfg.data, train_cfg.data_max_bytes) if corpus is None else corpus

    torch.manual_seed(train_cfg.seed)
    random.seed(train_cfg.seed)
    model = par.wrap(LanguageModel(model_cfg).to(device))
    optimizer = make_optimizer(model, train_cfg)
    generator = torch.Generator().manual_seed(train_cfg.seed)
    val_generator = torch.Generator().manual_seed(train_cfg.seed + 1)

    def batch(split: str, gen: torch.Generator) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
        """(the inputs (x, y) or packed (x, y, cu_seqlens), the loss weights or None): a global batch on the host
        (par.loss moves each rank's part). Validation batches go to the device once (single process)."""
        data = getattr(corpus, split)
        batch_device = "cpu" if par.distributed or split == "train" else device
        mix = train_cfg.passkey_fraction if split == "train" else 0.0  # validation stays plain text
        weight = train_cfg.passkey_answer_weight if mix and train_cfg.passkey_answer_weight != 1 else None
        if train_cfg.packed:
            out = get_packed_batch(data, getattr(corpus, f"{split}_starts"), train_cfg.batch_size,
                                   train_cfg.seq_len, gen, batch_device, mix, weight, train_cfg.passkey_needles)
        else:
            out = get_batch(data, train_cfg.batch_size, train_cfg.seq_len, gen, batch_device, mix, weight,
                            train_cfg.passkey_needles)
        return (out, None) if weight is None else (out[:-1], out[-1])

    @torch.no_grad()
    def validate() -> float:
        model.eval()
        with autocast(device):
            loss = sum(par.global_loss(par.loss(model, b, train_cfg.seq_len)[1]) for b in val_batches)
        model.train()
        return loss / len(val_batches)

    val_batches = [batch("val", val_generator)[0] for _ in range(train_cfg.eval_batches)]
    metrics_path = run_dir / METRICS_FILE
    start = 0
    if resume:
        if par.distributed:
            start = par.load(ckpt_path, model, optimizer, generator)
        else:
            start = load_checkpoint(ckpt_path, model, optimizer, data_generator=generator).step
        kept = [r for r in read_metrics(metrics_path) if r["step"] <= start] if metrics_path.exists() else []
        if par.is_main:
            atomic_write(metrics_path, "".join(json.dumps(r) + "\n" for r in kept).encode())  # drop steps after it
    elif par.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())
        metrics_path.write_text("")
    last = train_cfg.steps if stop_at is None else min(train_cfg.steps, stop_at)

    def save(step: int, sampler_state: torch.Tensor) -> None:
        """Checkpoints after `step` updates; sampler_state: the data sampler's state after their batches."""
        sampler = torch.Generator()
        sampler.set_state(sampler_state)
        if par.distributed:
            par.save(ckpt_path, model, optimizer, step, sampler, config)
        else:
            save_checkpoint(ckpt_path, model, optimizer, step=step, data_generator=sampler, config=config)

    result = {"step": start, "loss": None, "val_loss": None, "run_dir": str(run_dir), "checkpoint": str(ckpt_path)}
    progress = progress and par.is_main
    with open(metrics_path, "a") if par.is_main else contextlib.nullcontext() as log:
        def write(record: dict) -> None:
            if log is not None:
                log.write(json.dumps(record) + "\n")
                log.flush()

        if not resume:
            result["val_loss"] = validate()
            write({"step": 0, "val_loss": result["val_loss"]})
        steps = range(start, last)
        if progress:
            steps = _progress_bar(train_cfg.steps, f"training {run_dir.name}", start=start, stop=last)
        tokens = train_cfg.batch_size * train_cfg.seq_len
        next_batch = batch("train", generator) if start < last else None
        for step in steps:
            t0 = time.perf_counter()
            inputs, weights = next_batch
            lr = lr_at(step, train_cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast(device):
                backward_loss, share = par.loss(model, inputs, train_cfg.seq_len, weights)
            optimizer.zero_grad(set_to_none=True)
            backward_loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
            optimizer.step()
            sampler_state = generator.get_state()  # after this step's batch: what a checkpoint of this step keeps
            if step + 1 < last:  # the next batch is built on the host while the device runs this step
                next_batch = batch("train", generator)
            loss = par.global_loss(share)  # waits for the device: the step's time is complete
            record = {"step": step + 1, "loss": loss, "lr": lr, "tokens_per_s": tokens / (time.perf_counter() - t0)}
            result.update(step=step + 1, loss=loss)
            if (step + 1) % train_cfg.eval_every == 0 or step + 1 == train_cfg.steps:
                record["val_loss"] = result["val_loss"] = validate()
            write(record)
            if (step + 1) % train_cfg.checkpoint_every == 0 or step + 1 == last:
                save(step + 1, sampler_state)
            if progress:
                postfix = {"loss": f"{loss:.3f}", "tok/s": f"{record['tokens_per_s']:,.0f}"}
                if result["val_loss"] is not None:
                    postfix["val"] = f"{result['val_loss']:.3f}"
                steps.set_postfix(postfix)
    if start == last and not ckpt_path.exists():
        save(start, generator.get_state())
    return result


# ---- presets and overrides (`nsa train --preset NAME --config FILE --set model.n_layer=4`) ----

# Plain dicts, so that an override of one field (model.n_embd) lets the derived ones (head_dim) follow.
PRESETS: dict[str, dict[str, dict]] = {
    # CPU tests and smoke runs: seconds on 2 cores with the PyTorch reference backend.
    "tiny": {"model": {"n_layer": 2, "n_embd": 32, "n_head": 4, "n_kv_head": 1,
                       "nsa": {"cmp_block": 8, "cmp_stride": 4, "slc_block": 8, "num_selected": 2, "window": 16}},
             "train": {"steps": 30, "batch_size": 4, "seq_len": 64, "lr": 3e-3, "warmup_steps": 5, "eval_every": 10,
                       "eval_batches": 2, "checkpoint_every": 10}},
    # One GPU, minutes: the demo's GPU model for longer.
    "small": {"model": {"n_layer": 6, "n_embd": 512, "n_head": 8, "n_kv_head": 2, "head_dim": 64,
                        "nsa": {"cmp_block": 32, "cmp_stride": 16, "slc_block": 64, "num_selected": 8, "window": 256}},
              "train": {"steps": 2000, "batch_size": 16, "seq_len": 1024, "lr": 1.5e-3, "warmup_steps": 100,
                        "eval_every": 100, "eval_batches": 8, "checkpoint_every": 500}},
    # One GPU, hours: the paper's block parameters at a 4k context (give it more data: --set train.data=PATH).
    "base": {"model": {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_kv_head": 2, "head_dim": 64, "nsa": {}},
             "train": {"steps": 10000, "batch_size": 8, "seq_len": 4096, "lr": 6e-4, "warmup_steps": 500,
                       "eval_every": 250, "eval_batches": 8, "checkpoint_every": 1000,
                       "data_max_bytes": 1_000_000_000}},
}
SECTIONS = {"model": ModelConfig, "model.nsa": NSAConfig, "train": TrainConfig}


def _coerce(section: str, name: str, value):
    """A float field given an int becomes a float (lr=1 -> 1.0); every other check is the config's own."""
    ftype = {f.name: f.type for f in fields(SECTIONS[section])}[name]
    if isinstance(value, int) and not isinstance(value, bool) and str(ftype).startswith("float"):
        return float(value)
    return value


def apply_overrides(config: dict, overrides: dict, where: str = "") -> dict:
    """A copy of config ({"model": {..., "nsa": {...}}, "train": {...}}) with overrides (the same shape, or
    dotted keys such as "model.nsa.window") applied; unknown sections or fields raise a ValueError naming them."""
    out = {"model": dict(config.get("model", {})), "train": dict(config.get("train", {}))}
    out["model"]["nsa"] = dict(out["model"].get("nsa", {}))
    flat = {}

    def walk(prefix, d):
        for key, value in d.items():
            path = f"{prefix}.{key}" if prefix else key
            if isinstance(value, dict):
                walk(path, value)
            else:
                flat[path] = value
    walk("", overrides)
    for path, value in flat.items():
        section, _, name = path.rpartition(".")
        if section not in SECTIONS:
            raise ValueError(f"{where}unknown setting {path!r}: settings are model.FIELD, model.nsa.FIELD or "
                             "train.FIELD")
        known = [f.name for f in fields(SECTIONS[section]) if not (section == "model" and f.name == "nsa")]
        if name not in known:
            raise ValueError(f"{where}unknown setting {path!r}; {section} has {', '.join(known)}")
        target = out["model"]["nsa"] if section == "model.nsa" else out[section]
        target[name] = _coerce(section, name, value)
    return out


def build_configs(config: dict) -> tuple[ModelConfig, TrainConfig]:
    """{"model": {..., "nsa": {...}}, "train": {...}} -> (ModelConfig, TrainConfig), validated by their constructors."""
    return ModelConfig.from_dict(config["model"]), TrainConfig(**config["train"])
