"""The `nsa` command. `nsa demo` trains a tiny NSA model and a tiny full-attention model side by side;
`nsa train` trains one model in a run folder (metrics, checkpoints, exact resume).

Both models have the same sizes and the same seed and see the same batches; the demo prints their
final losses, saves a plot of both loss curves and prints a sample from each.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import textwrap
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from .checkpoint import load_model
from .config import NSAConfig
from .data import DEFAULT_MAX_BYTES, decode, load_corpus
from .model import LanguageModel, ModelConfig
from .train import (CHECKPOINT_FILE, CONFIG_FILE, METRICS_FILE, PRESETS, History, TrainConfig, apply_overrides,
                    autocast, build_configs, config_dict, train, train_run)


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
    for name in ("tqdm", "matplotlib", "safetensors"):
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


def _field_list(section: str, names: list[str]) -> str:
    return textwrap.fill(", ".join(names), width=100, initial_indent=f"  {section + ':':<11}", subsequent_indent=" " * 13)


TRAIN_HELP = f"""Train one language model in a run folder RUN: RUN/{CONFIG_FILE} (the configs), RUN/{METRICS_FILE}
(one JSON line per step: step, loss, lr, tokens_per_s, and val_loss every train.eval_every steps) and
RUN/{CHECKPOINT_FILE} (the latest checkpoint, every train.checkpoint_every steps and at the end).
`nsa train --resume RUN` continues a run exactly (bitwise, on the same device) from its checkpoint.

Settings, each later source overriding the earlier: the preset (--preset), a TOML or JSON file (--config:
tables [model], [model.nsa], [train]), then --set SECTION.FIELD=VALUE flags (values are read as JSON,
else as strings: --set model.n_layer=4 --set model.nsa.window=128 --set train.lr=1e-3
--set train.data=corpus/ --set model.attention=full). The fields:
{_field_list("model", [f.name for f in fields(ModelConfig) if f.name != "nsa"])}
{_field_list("model.nsa", [f.name for f in fields(NSAConfig)])}
{_field_list("train", [f.name for f in fields(TrainConfig)])}
Presets: tiny (CPU tests, seconds), small (one GPU, minutes), base (one GPU, hours; give it data).
Ablations: --set model.attention=full; --set 'model.branches=["swa"]' (NSA with its compressed and
selected gates forced to 0: window only). --set train.packed=true splits windows at file boundaries
into packed sequences (cu_seqlens): nothing attends or is predicted across documents.
--set train.data=python-env: the .py files of this Python environment (stdlib and site-packages).
--set train.passkey_fraction=0.2: that share of training windows become passkey samples with their
answer (nsa eval passkey's pattern); validation windows stay plain text. --set train.passkey_needles=16:
1..16 needle-question-answer segments a sample; --set train.passkey_answer_weight=10: answers weigh more.
On CUDA the forward passes run under bfloat16 autocast; AdamW, warm-up then cosine, gradient clipping.
Several GPUs: torchrun --standalone --nproc-per-node N -m nsa train --run-dir RUN ... --set train.parallel=ddp
(or fsdp) [--set train.context_parallel=C]; the checkpoint is then the folder RUN/checkpoint, resumable on any
world size (--run-dir: torchrun takes --run for its own --run-path).
"""


def parse_set(items: list[str]) -> dict:
    """["model.n_layer=4", ...] -> {"model.n_layer": 4, ...}; values as JSON (true, null, 1e-3, "x"), else strings."""
    out = {}
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--set {item!r}: expected SECTION.FIELD=VALUE, e.g. model.n_layer=4")
        try:
            value = json.loads(text)
        except ValueError:
            value = {"None": None, "True": True, "False": False}.get(text, text)
        out[key.strip()] = value
    return out


def read_config_file(path: str | os.PathLike) -> dict:
    """A TOML (.toml) or JSON file of settings -> dict; clear errors for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config: {path} does not exist or is not a file")
    text = path.read_text()
    try:
        import tomllib  # Python >= 3.11
    except ImportError:  # Python 3.10: the `cli` extra installs tomli, the same parser
        import tomli as tomllib
    try:
        config = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, ValueError) as e:
        raise ValueError(f"--config: {path} is not valid {'TOML' if path.suffix.lower() == '.toml' else 'JSON'}: {e}")
    if not isinstance(config, dict):
        raise ValueError(f"--config: {path} must hold a table / object of settings")
    return config


def train_command(args) -> int:
    dev = resolve_device(args.device)
    if args.resume:
        if args.config or args.set or args.preset or args.run:
            raise ValueError("--resume RUN continues the run with its saved settings; "
                             "--preset, --config, --set and --run do not go with it")
        run = Path(args.resume)
        print(f"resuming {run} on {dev}")
        result = train_run(run, device=dev, resume=True, stop_at=args.stop_at, progress=not args.no_progress)
    else:
        preset = args.preset or "tiny"
        config = apply_overrides(PRESETS[preset], {}, "")
        if args.config:
            config = apply_overrides(config, read_config_file(args.config), f"--config {args.config}: ")
        config = apply_overrides(config, parse_set(args.set or []), "--set: ")
        model_cfg, train_cfg = build_configs(config)
        run = Path(args.run or f"runs/{preset}")
        if (run / CHECKPOINT_FILE).exists():
            raise ValueError(f"--run: {run} already holds a run; continue it with --resume {run} "
                             "or choose another folder")
        print(f"run {run} on {dev}: preset {preset}")
        print(json.dumps(config_dict(model_cfg, train_cfg)))
        result = train_run(run, model_cfg, train_cfg, device=dev, stop_at=args.stop_at,
                           progress=not args.no_progress)
    loss, val = (("n/a" if result[k] is None else f"{result[k]:.4f}") for k in ("loss", "val_loss"))
    print(f"step {result['step']}: loss {loss}, val_loss {val}; checkpoint {result['checkpoint']}, "
          f"metrics {run / METRICS_FILE}")
    return 0


def plot_runs(runs: list[str | os.PathLike], out: str | os.PathLike, title: str | None = None) -> Path:
    """Saves the loss curves of `nsa train` runs (train loss faint, validation loss with markers) to a PNG."""
    from .train import read_metrics
    given = Path(out)
    out = given if given.suffix.lower() == ".png" else given.with_name(given.name + ".png")
    check_out(given, out)
    history = {}
    for run in runs:
        records = read_metrics(run)
        h = History()
        for r in records:
            if "loss" in r:
                h.steps.append(r["step"])
                h.train_loss.append(r["loss"])
            if "val_loss" in r:
                h.val_steps.append(r["step"])
                h.val_loss.append(r["val_loss"])
        name = Path(run).name if Path(run).is_dir() else Path(run).parent.name
        while name in history:
            name += "'"
        history[name] = h
    plot_losses(history, out, title or "loss curves of " + ", ".join(history))
    return out


def parse_list(text: str, kind, flag: str) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise ValueError(f"{flag}: give at least one value")
    return values


def eval_passkey_command(args) -> int:
    from . import eval as evaluation
    lengths = parse_list(args.lengths, int, "--lengths")
    depths = parse_list(args.depths, float, "--depths")
    if args.trials < 1:
        raise ValueError(f"--trials must be >= 1, got {args.trials}")
    model, corpus, out = load_eval_inputs(args)
    source = Path(args.path)
    print(f"passkey: {args.path} on {next(model.parameters()).device}; filler from the validation part of "
          f"{corpus.source}")
    print(f"lengths {lengths} x depths {depths}, {args.trials} trials per cell")

    def report(cell):
        line = (f"  length {cell['length']:>6}  depth {cell['depth']:.2f}: {cell['correct']}/{cell['trials']}"
                f"  (digits {cell['digits_right']}/{sum(map(len, cell['keys']))})")
        if "nsa_layers" in cell:
            line += ("  key-block hit rate per layer " + " ".join(f"{s['hit_rate']:.2f}" for s in cell["nsa_layers"])
                     + f" (chance {cell['nsa_layers'][0]['chance']:.2f})")
        print(line)
    results = evaluation.passkey_grid(model, corpus.val, lengths, depths, args.trials, args.seed, progress=report)
    results["checkpoint"] = str(args.path)
    results["data"] = corpus.source
    json_path = evaluation.save_results(results, out / "passkey.json")
    png = evaluation.plot_heatmap(results, out / "passkey.png", f"passkey retrieval: {source.name}")
    print(f"key digits right at their places over the grid: {results['digit_accuracy']:.3f} (a uniform guess: 0.10)")
    if "nsa_layers" in results:
        print("NSA layers over the grid: how often the key digits' blocks are selected at the answering position "
              "(per KV head group), and the mean gates over the prompts:")
        for i, s in enumerate(results["nsa_layers"]):
            gates = "  ".join(f"{b} {g:.3f}" for b, g in s["gate_mean"].items())
            print(f"  layer {i}: hit rate {s['hit_rate']:.3f} (chance {s['chance']:.3f})  gates {gates}  compressed "
                  f"attention on the key's tokens: {max(s['key_attention']):.3f} in the head that looks most "
                  f"(an even spread {s['key_attention_uniform']:.3f}), its entropy {min(s['cmp_entropy']):.2f}-"
                  f"{max(s['cmp_entropy']):.2f} nats over the heads (an even spread {s['cmp_entropy_uniform']:.2f})")
    print(f"results saved to {json_path.resolve()}, heatmap to {png.resolve()}")
    return 0


def run_corpus(config: dict, data: str | None = None):
    """The corpus that a checkpoint's run trained on (config: the checkpoint's), whose validation part evaluations
    draw from; data: another text file or folder instead."""
    train_cfg = config.get("train", {})
    return load_corpus(data if data is not None else train_cfg.get("data"),
                       train_cfg.get("data_max_bytes", DEFAULT_MAX_BYTES))


def load_eval_inputs(args) -> tuple:
    """(model, the corpus of its text, the out folder) of `nsa eval ...` args."""
    model, config = load_model(args.path, resolve_device(args.device))
    source = Path(args.path)
    out = Path(args.out) if args.out else (source if source.is_dir() else source.parent) / args.eval_command
    return model, run_corpus(config, args.data), out


def eval_repeat_command(args) -> int:
    from . import eval as evaluation
    lengths = parse_list(args.lengths, int, "--lengths")
    if args.trials < 1:
        raise ValueError(f"--trials must be >= 1, got {args.trials}")
    model, corpus, out = load_eval_inputs(args)
    print(f"repeat: {args.path}; chunks of the validation part of {corpus.source}, each written twice; "
          f"{args.trials} prompts per length")
    results = evaluation.repeat_loss(model, corpus.val, lengths, args.trials, args.seed)
    results["checkpoint"] = str(args.path)
    results["data"] = corpus.source
    print("  length  distance  loss 1st copy  loss 2nd copy  (nats/byte)")
    for n, a, b in zip(results["lengths"], results["first"], results["second"]):
        print(f"  {n:>6}  {n // 2:>8}  {a:>13.4f}  {b:>13.4f}")
    if any(results["nsa_layers"]):
        print("  NSA layers: share of second-copy queries whose selected blocks hold the byte to copy (chance)")
        for n, layers in zip(results["lengths"], results["nsa_layers"]):
            cells = ", ".join(f"layer {i} {x['hit_rate']:.3f} ({x['chance']:.3f})" for i, x in enumerate(layers))
            print(f"  {n:>6}  {cells}")
    print(f"results saved to {evaluation.save_results(results, out / 'repeat.json').resolve()}")
    return 0


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
    p.add_argument("--data", help="a text file, a folder of text files or python-env (default: the Python stdlib's .py "
                                   "files)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-len", type=int, help=f"bytes generated per sample (default: {CPU_PRESET.sample_len} on "
                                                  f"CPU, {GPU_PRESET.sample_len} on GPU)")

    t = commands.add_parser("train", help="train one model in a run folder (metrics, checkpoints, --resume)",
                            description=TRAIN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--preset", choices=sorted(PRESETS), help="the starting settings (default: tiny)")
    t.add_argument("--config", metavar="FILE", help="a TOML or JSON file of settings ([model], [model.nsa], [train])")
    t.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                   help="one setting, e.g. model.n_layer=4 or train.lr=1e-3 (repeatable)")
    t.add_argument("--run", "--run-dir", dest="run", metavar="RUN",
                   help="the run folder (default: runs/PRESET); under torchrun spell it --run-dir (torchrun reads "
                        "--run as its own --run-path)")
    t.add_argument("--resume", metavar="RUN", help="continue the run in this folder from its checkpoint")
    t.add_argument("--stop-at", type=int, metavar="STEP", help="stop (with a checkpoint) after this step")
    t.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    pl = commands.add_parser("plot", help="plot the loss curves of runs of `nsa train`",
                             description="Plots train (faint) and validation (markers) loss against the step of "
                                         "each run's metrics.jsonl, all in one PNG.")
    pl.add_argument("runs", nargs="+", metavar="RUN", help="run folders (or their metrics.jsonl files)")
    pl.add_argument("--out", required=True, help="the PNG to write")
    pl.add_argument("--title", help="the plot's title")

    ev = commands.add_parser("eval", help="evaluate a trained model")
    evals = ev.add_subparsers(dest="eval_command", required=True)
    pk = evals.add_parser("passkey", help="passkey retrieval over a grid of context lengths x depths",
                          description="A random 5-digit passkey stated once (\"The passkey is 48213. Remember "
                                      "it.\") at a depth inside filler from validation text; the prompt ends with "
                                      "\"What is the passkey? The passkey is\" and the model answers greedily. "
                                      "Writes passkey.json (accuracy per cell, every answer) and passkey.png "
                                      "(a heatmap).")
    pk.add_argument("path", metavar="RUN_OR_CHECKPOINT", help="an nsa train run folder or a checkpoint file")
    pk.add_argument("--lengths", default="256,512,1024", help="context lengths in bytes (default: 256,512,1024)")
    pk.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths in [0, 1] (default: 0,0.25,0.5,0.75,1)")
    pk.add_argument("--trials", type=int, default=5, help="prompts per cell (default: 5)")
    rp = evals.add_parser("repeat", help="in-context copying at a distance: the loss on a text chunk's second copy",
                          description="Random chunks of n = length / 2 validation bytes, each written twice; prints "
                                      "and writes to repeat.json the mean loss on the first and on the second copy "
                                      "(the same bytes, n bytes later). Lower on the second: the model retrieves "
                                      "from n bytes back; equal: it cannot see that far.")
    rp.add_argument("path", metavar="RUN_OR_CHECKPOINT", help="an nsa train run folder or a checkpoint file")
    rp.add_argument("--lengths", default="512,1024,2048", help="prompt lengths in bytes (default: 512,1024,2048)")
    rp.add_argument("--trials", type=int, default=8, help="prompts per length (default: 8)")
    for sub, name in ((pk, "passkey"), (rp, "repeat")):
        sub.add_argument("--data", help="text file or folder, or python-env (default: the run's training data)")
        sub.add_argument("--out", help=f"the results folder (default: RUN/{name})")
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
    args = parser.parse_args(argv)
    try:
        require_cli_deps()
    except ModuleNotFoundError as e:
        parser.exit(1, f"nsa: {e}\n")
    if args.command == "train":
        return train_command(args)
    if args.command == "eval":
        return eval_passkey_command(args) if args.eval_command == "passkey" else eval_repeat_command(args)
    if args.command == "plot":
        print(f"loss plot saved to {plot_runs(args.runs, args.out, args.title).resolve()}")
        return 0
    demo(steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size, device=args.device,
         out=args.out, data=args.data, seed=args.seed, sample_len=args.sample_len)
    return 0
