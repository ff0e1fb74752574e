"""The `nsa` command. `nsa demo` trains a tiny NSA model and a tiny full-attention model side by side.

Both models have the same sizes and the same seed and see the same batches; the demo prints their
final losses, saves a plot of both loss curves and prints a sample from each.
"""
from __future__ import annotations

import argparse
import importlib
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .config import NSAConfig
from .data import decode, load_corpus
from .model import LanguageModel, ModelConfig
from .train import History, TrainConfig, autocast, train


@dataclass(frozen=True)
class DemoPreset:
    model: ModelConfig  # attention is set per model
    train: TrainConfig
    sample_len: int  # bytes generated per sample


# CPU: ~2 minutes on 2 cores with the PyTorch reference backend. At T = 256 each query reads
# at most 4 * 32 selected + 64 window tokens, so the sparsity is real.
CPU_PRESET = DemoPreset(
    ModelConfig(n_layer=2, n_embd=128, n_head=4, n_kv_head=1,
                nsa=NSAConfig(cmp_block=16, cmp_stride=8, slc_block=32, num_selected=4, window=64)),
    TrainConfig(steps=280, batch_size=8, seq_len=256, lr=3e-3, warmup_steps=20, eval_every=20),
    sample_len=120)
# GPU: a longer context and a bigger model, ~2.5 minutes on one H100 (the first run also compiles the Triton
# kernels, about a minute); the attention backend is picked automatically (Triton on CUDA).
GPU_PRESET = DemoPreset(
    ModelConfig(n_layer=6, n_embd=512, n_head=8, n_kv_head=2, head_dim=64,
                nsa=NSAConfig(cmp_block=32, cmp_stride=16, slc_block=64, num_selected=8, window=256)),
    TrainConfig(steps=600, batch_size=16, seq_len=1024, lr=1.5e-3, warmup_steps=50, eval_every=50),
    sample_len=200)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def require_cli_deps() -> None:
    """Raises ModuleNotFoundError naming the fix when the `nsa` command's optional dependencies are missing."""
    missing = []
    for name in ("tqdm", "matplotlib"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ModuleNotFoundError(f"the nsa command needs {' and '.join(missing)}: pip install \"nsa[cli]\"")


def check_out(given: Path, out: Path) -> None:
    """The plot can be saved at `out` (the PNG name of --out `given`): neither is a folder and the nearest
    existing folder above `out` is writable (missing folders are made when saving)."""
    for path in (given, out):
        if path.is_dir():
            raise ValueError(f"--out: {path} is a folder; give a file name such as {path / 'loss.png'}")
    if out.exists() and not os.access(out, os.W_OK):
        raise ValueError(f"--out: {out} exists and is not writable")
    folder = out.absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"--out: {folder} is not a folder, so {out} cannot be saved under it")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"--out: the folder {folder} is not writable; choose another --out")


def plot_losses(history: dict[str, History], path: Path, title: str) -> None:
    """Saves train (faint) and validation (markers) loss curves of every model to a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for k, (name, h) in enumerate(history.items()):
        color = f"C{k}"
        ax.plot(h.steps, h.train_loss, color=color, alpha=0.35, linewidth=1, label=f"{name} train")
        ax.plot(h.val_steps, h.val_loss, color=color, marker="o", markersize=4, label=f"{name} validation")
    ax.set(title=title, xlabel="training step", ylabel="cross-entropy (nats per byte)")
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def demo(steps: int | None = None, seq_len: int | None = None, batch_size: int | None = None, device: str = "auto",
         out: str | Path = "runs/demo/loss.png", data: str | Path | None = None, seed: int = 0,
         sample_len: int | None = None, progress: bool = True) -> dict[str, History]:
    """Trains NSA and full attention side by side; None options take the device's preset. Returns the histories."""
    start = time.time()
    require_cli_deps()
    given = Path(out)
    out = given if given.suffix.lower() == ".png" else given.with_name(given.name + ".png")  # always a PNG
    check_out(given, out)  # before training, not after
    dev = resolve_device(device)
    preset = GPU_PRESET if dev.type == "cuda" else CPU_PRESET
    overrides = {"steps": steps, "seq_len": seq_len, "batch_size": batch_size}
    train_cfg = replace(preset.train, seed=seed, **{k: v for k, v in overrides.items() if v is not None})
    if train_cfg.eval_every > train_cfg.steps:
        train_cfg = replace(train_cfg, eval_every=train_cfg.steps)
    sample_len = preset.sample_len if sample_len is None else sample_len

    corpus = load_corpus(data)
    print(f"data: {corpus.source}: {len(corpus.train):,} bytes train, {len(corpus.val):,} bytes validation")
    print(f"device: {dev}, {train_cfg.steps} steps of {train_cfg.batch_size} x {train_cfg.seq_len} bytes")
    models = {}
    for attention in ("nsa", "full"):
        torch.manual_seed(seed)
        models[attention] = LanguageModel(replace(preset.model, attention=attention)).to(dev)
        print(f"{attention:>4}: {models[attention].num_params() / 1e6:.2f} M parameters")
    print(f"nsa config: {preset.model.nsa}")

    history = train(models, corpus, train_cfg, device=dev, progress=progress)

    print("final losses (train: mean of the last 10 steps):")
    for name, h in history.items():
        train_loss = sum(h.train_loss[-10:]) / len(h.train_loss[-10:])
        print(f"  {name:>4}: train {train_loss:.3f}  validation {h.val_loss[-1]:.3f}  (start {h.val_loss[0]:.3f})")
    plot_losses(history, out, f"NSA vs full attention, byte-level LM, T = {train_cfg.seq_len}")
    print(f"loss plot saved to {out.resolve()}")

    prompt = corpus.val[:32].long()[None].to(dev)
    for name, model in models.items():
        generator = torch.Generator(dev).manual_seed(seed)
        with autocast(dev):
            sample = model.generate(prompt, sample_len, temperature=0.8, top_p=0.95, generator=generator)
        print(f"--- sample from {name} (prompt: the first {prompt.shape[1]} bytes of the validation data) ---")
        print(decode(sample[0].cpu()))
    print(f"--- done in {time.time() - start:.0f} s ---")
    return history


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nsa", description="Native Sparse Attention tools")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("demo", help="train a tiny NSA model and a tiny full-attention model side by side",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, field, meaning in (("--steps", "steps", "training steps"), ("--seq-len", "seq_len", "bytes per window"),
                                 ("--batch-size", "batch_size", "windows per step")):
        cpu, gpu = getattr(CPU_PRESET.train, field), getattr(GPU_PRESET.train, field)
        p.add_argument(flag, type=int, help=f"{meaning} (default: {cpu} on CPU, {gpu} on GPU)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--out", default="runs/demo/loss.png", help="where to save the loss plot (PNG)")
    p.add_argument("--data", help="a text file or a folder of text files (default: the Python stdlib's .py files)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-len", type=int, help=f"bytes generated per sample (default: {CPU_PRESET.sample_len} on "
                                                  f"CPU, {GPU_PRESET.sample_len} on GPU)")
    args = parser.parse_args(argv)
    try:
        require_cli_deps()
    except ModuleNotFoundError as e:
        parser.exit(1, f"nsa: {e}\n")
    demo(steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size, device=args.device,
         out=args.out, data=args.data, seed=args.seed, sample_len=args.sample_len)
    return 0
