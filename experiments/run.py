"""Runs one experiment of EXPERIMENTS.md end to end: trains its models, evaluates them, plots, summarizes.

    python experiments/run.py EXPERIMENT OUTDIR [--models nsa,swa] [--set KEY=VALUE ...] [--tiny] [--dry-run]
                                                                          (EXPERIMENT: loss, retrieval, learned)

Every step is an `nsa` command or experiments/key_ablation.py, printed before it runs (EXPERIMENTS.md lists them),
run in this process. Runs
go to OUTDIR/EXPERIMENT/MODEL; OUTDIR/EXPERIMENT/summary.json gets each model's final validation loss, median
ms per training step and wall time, each evaluation's accuracy (per length, and the whole grid) and NSA layer
statistics, and the key ablations of the NSA models (which branch of which layer the answer comes from).
`learned` evaluates the models of `retrieval` (run it first with the same OUTDIR).
--set: passed to every `nsa train` of the experiment after the model's own overrides (e.g. train.steps=2400).
--tiny: the tiny preset's model, a few steps and a small grid on the CPU: the whole pipeline in seconds (a test).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from nsa.cli import main as nsa_main
from nsa.eval import passkey_min_length
from nsa.train import CHECKPOINT_FILE, PRESETS, read_metrics

HERE = Path(__file__).resolve().parent
TINY_STEPS = 4
TINY_NEEDLES = 2  # passkey needles a window at most (the experiments' configs may ask more: too long for tiny windows)
TINY_GRID = ("96,128", "0,1", 1)  # lengths, depths, trials of the tiny evaluations (repeat: the same lengths)
WARMUP_STEPS_EXCLUDED = 10  # the first steps compile kernels: left out of the median step time


@dataclass(frozen=True)
class Passkey:
    lengths: str
    depths: str
    trials: int


@dataclass(frozen=True)
class Experiment:
    config: str | None  # the TOML under experiments/ (None: no training)
    models: dict[str, list[str]] = field(default_factory=dict)  # name -> its --set overrides
    passkey: Passkey | None = None
    repeat_lengths: str | None = None  # `nsa eval repeat --lengths` of each model (None: not run)
    evaluates: str | None = None  # evaluate the models of this experiment instead of training
    ablate: tuple[str, ...] = ()  # the models that key_ablation.py takes apart (NSA models with cmp and slc on)
    ablation_lengths: str | None = None  # its --lengths


def tenths(first: int, last: int) -> str:
    """Depths first/10 .. last/10 as --depths wants them: tenths(0, 2) == "0,0.1,0.2"."""
    return ",".join(f"{d / 10:g}" for d in range(first, last + 1))


UNGATED = ['model.ungated=["cmp"]']

EXPERIMENTS = {
    # nsa-ungated: the compressed branch added with weight 1 (model.ungated), an ablation (--models picks models)
    "loss": Experiment("loss-8k.toml", {"nsa": [], "full": ["model.attention=full"], "nsa-ungated": UNGATED},
                       repeat_lengths="1024,4096,8192,16384"),
    "retrieval": Experiment("retrieval-8k.toml",
                            {"nsa": [], "full": ["model.attention=full"], "swa": ['model.branches=["swa"]'],
                             "nsa-ungated": UNGATED},
                            Passkey("1024,2048,4096,8192,16384", tenths(0, 10), 8), "1024,2048,4096,8192,16384",
                            ablate=("nsa", "nsa-ungated"), ablation_lengths="1024,2048,4096,8192"),
    # depths 0 and 1 are left out: blocks 0, J - 1 and J are always selected, so keys there are hits by construction
    "learned": Experiment(None, {"nsa": [], "swa": [], "nsa-ungated": []},
                          Passkey("2048,4096,8192,16384", tenths(1, 9), 16), evaluates="retrieval"),
}


def tiny_overrides() -> list[str]:
    """--set flags that shrink an experiment to the tiny preset's model and TINY_STEPS steps of 2 short windows
    (TINY_NEEDLES passkey needles a window at most)."""
    tiny = PRESETS["tiny"]
    sets = [f"model.{k}={json.dumps(v)}" for k, v in tiny["model"].items() if k != "nsa"]
    sets += ["model.head_dim=null"] + [f"model.nsa.{k}={v}" for k, v in tiny["model"]["nsa"].items()]
    train = dict(tiny["train"], steps=TINY_STEPS, batch_size=2, eval_batches=1, passkey_needles=TINY_NEEDLES,
                 seq_len=TINY_NEEDLES * passkey_min_length() + 16,
                 data_max_bytes=300_000)
    return sets + [f"train.{k}={json.dumps(v)}" for k, v in train.items()]


def key_ablation():
    """experiments/key_ablation.py as a module (experiments/ is no package)."""
    spec = importlib.util.spec_from_file_location("key_ablation", HERE / "key_ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_dir(name: str, out: Path, model: str) -> Path:
    """Where the model of experiment `name` is trained (for `learned`: the run it evaluates)."""
    return out / (EXPERIMENTS[name].evaluates or name) / model


def chosen(name: str, models: list[str] | None) -> list[str]:
    """The models of experiment `name` to run: all (models None) or the given ones, in the experiment's order."""
    known = list(EXPERIMENTS[name].models)
    if models is None:
        return known
    unknown = [m for m in models if m not in known]
    if unknown or not models:
        raise ValueError(f"--models: {name} has the models {known}, got {models}")
    return [m for m in known if m in models]


def commands(name: str, out: Path, tiny: bool = False, models: list[str] | None = None,
             overrides: list[str] = ()) -> list[tuple[str, list[str]]]:
    """The `nsa` commands of experiment `name` (its `models`, default all) writing under out, in order: (a label,
    argv) pairs; overrides: --set flags of every training run, after the model's own."""
    if overrides and EXPERIMENTS[name].config is None:
        raise ValueError(f"--set: {name} trains nothing (it evaluates the models of {EXPERIMENTS[name].evaluates})")
    exp = EXPERIMENTS[name]
    names = chosen(name, models)
    device = ["--device", "cpu"] if tiny else []
    steps = []
    if exp.config is not None:
        config = os.path.relpath(HERE / exp.config)
        for model in names:
            sets = exp.models[model] + list(overrides) + (tiny_overrides() if tiny else [])
            flags = [x for s in sets for x in ("--set", s)]
            steps.append((f"train {model}", ["nsa", "train", "--config", config, "--run", str(run_dir(name, out, model)),
                                             *flags, *device] + (["--no-progress"] if tiny else [])))
    if exp.passkey is not None:
        lengths, depths, trials = TINY_GRID if tiny else (exp.passkey.lengths, exp.passkey.depths, exp.passkey.trials)
        for model in names:
            steps.append((f"eval {model}", ["nsa", "eval", "passkey", str(run_dir(name, out, model)), "--lengths",
                                            lengths, "--depths", depths, "--trials", str(trials),
                                            "--out", str(out / name / model / "passkey"), *device]))
    if exp.repeat_lengths is not None:
        lengths, trials = (TINY_GRID[0], TINY_GRID[2]) if tiny else (exp.repeat_lengths, 8)
        for model in names:
            steps.append((f"repeat {model}", ["nsa", "eval", "repeat", str(run_dir(name, out, model)), "--lengths",
                                              lengths, "--trials", str(trials),
                                              "--out", str(out / name / model / "repeat"), *device]))
    for model in (m for m in names if m in exp.ablate):
        steps.append((f"ablate {model}", ["python", os.path.relpath(HERE / "key_ablation.py"),
                                          str(run_dir(name, out, model)), "--lengths",
                                          TINY_GRID[0] if tiny else exp.ablation_lengths,
                                          "--out", str(out / name / model / "key_ablation.json"), *device]))
    if exp.config is not None:
        steps.append(("plot", ["nsa", "plot", *(str(run_dir(name, out, m)) for m in names),
                               "--out", str(out / name / "loss.png"), "--title", f"{name}: " + " vs ".join(names)]))
    return steps


def summarize(name: str, out: Path, wall: dict[str, float], models: list[str] | None = None) -> dict:
    """What the experiment's runs and evaluations wrote, condensed: {"experiment", "models": {MODEL: {...}}}."""
    exp = EXPERIMENTS[name]
    summary = {"experiment": name, "models": {}}
    for model in chosen(name, models):
        entry = summary["models"][model] = {}
        if exp.config is not None:
            run = run_dir(name, out, model)
            records = read_metrics(run)
            config = json.loads((run / "config.json").read_text())["train"]
            tokens = config["batch_size"] * config["seq_len"]
            timed = [r for r in records if "tokens_per_s" in r]
            timed = timed[WARMUP_STEPS_EXCLUDED:] or timed
            entry["final_val_loss"] = [r["val_loss"] for r in records if "val_loss" in r][-1]
            entry["median_ms_per_step"] = statistics.median(1000 * tokens / r["tokens_per_s"] for r in timed)
            entry["train_wall_s"] = wall[f"train {model}"]
        if exp.passkey is not None:
            results = json.loads((out / name / model / "passkey" / "passkey.json").read_text())
            entry["accuracy_by_length"] = {str(n): sum(row) / len(row)
                                           for n, row in zip(results["lengths"], results["accuracy"])}
            entry["accuracy"] = {"depths": results["depths"],  # the grid itself: {"depths", LENGTH: [per depth]}
                                 **{str(n): row for n, row in zip(results["lengths"], results["accuracy"])}}
            if "nsa_layers" in results:
                kept = ("hit_rate", "chance", "gate_mean", "key_attention", "key_attention_uniform", "cmp_entropy",
                        "cmp_entropy_uniform")
                entry["nsa_layers"] = [{k: s[k] for k in kept} for s in results["nsa_layers"]]
            entry["eval_wall_s"] = wall[f"eval {model}"]
        if exp.repeat_lengths is not None:
            results = json.loads((out / name / model / "repeat" / "repeat.json").read_text())
            entry["repeat_loss_by_length"] = {str(n): {"first": a, "second": b, "nsa_layers": layers} for n, a, b, layers
                                              in zip(results["lengths"], results["first"], results["second"],
                                                     results["nsa_layers"])}
        if model in exp.ablate:
            results = json.loads((out / name / model / "key_ablation.json").read_text())
            entry["key_ablation"] = {k: results[k] for k in ("lengths", "none", "layers")}
    return summary


def run(name: str, out: Path, tiny: bool = False, dry_run: bool = False, models: list[str] | None = None,
        overrides: list[str] = ()) -> dict | None:
    """Runs (or with dry_run only prints) the experiment's commands for its `models` (default all) with the
    training `overrides`; returns the summary (also saved)."""
    exp = EXPERIMENTS[name]
    if exp.evaluates is not None and not dry_run:
        for model in chosen(name, models):
            if not (run_dir(name, out, model) / CHECKPOINT_FILE).exists():
                raise FileNotFoundError(f"{name} evaluates the models of {exp.evaluates}: "
                                        f"{run_dir(name, out, model)} has no checkpoint; run "
                                        f"`python experiments/run.py {exp.evaluates} {out}` first")
    wall = {}
    for label, argv in commands(name, out, tiny, models, overrides):
        print("$ " + shlex.join(argv), flush=True)
        if not dry_run:
            start = time.perf_counter()
            if argv[0] == "nsa":
                nsa_main(argv[1:])
            else:
                key_ablation().main(argv[2:])
            wall[label] = time.perf_counter() - start
    if dry_run:
        return None
    summary = summarize(name, out, wall, models)
    path = out / name / "summary.json"
    path.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    print(f"summary saved to {path}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=list(EXPERIMENTS))
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--tiny", action="store_true", help="the tiny preset, a few steps, on the CPU")
    parser.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    parser.add_argument("--models", help="comma-separated: only these of the experiment's models (default: all)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every training run (repeatable), as nsa train --set takes it")
    args = parser.parse_args(argv)
    models = None if args.models is None else [m.strip() for m in args.models.split(",")]
    run(args.experiment, args.outdir, args.tiny, args.dry_run, models, args.overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
