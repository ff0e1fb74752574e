"""Checkpoints in one safetensors file, written atomically, for exact resume.

One file holds every tensor (the model's parameters and buffers under "model/", the optimizer state under
"optim/", RNG states under "rng/") and, in the safetensors metadata (key "nsa", a JSON string), the step,
the configs, the optimizer's param groups, Python's `random` state and anything else the caller adds.
One file means one atomic replace: `save_checkpoint` writes a temporary file in the same folder, fsyncs
it, then `os.replace`s it over the old checkpoint, so a crash while saving leaves the previous checkpoint
intact and loadable.

Exact resume: restoring the model, the optimizer, the global RNGs (torch CPU, CUDA when present, Python
`random`) and the data sampler's torch.Generator makes the continued run bitwise equal to an uninterrupted
one on the same device.

safetensors is an optional dependency (`pip install "nsa[cli]"`); it is imported only when a checkpoint
is written or read.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .model import LanguageModel, ModelConfig

FORMAT = "nsa-checkpoint/1"
META_KEY = "nsa"


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as e:
        raise ModuleNotFoundError('nsa checkpoints need safetensors: pip install "nsa[cli]"') from e
    return safetensors.torch


@dataclass
class Checkpoint:
    """What load_checkpoint read besides the tensors it restored in place."""
    path: Path
    step: int
    config: dict = field(default_factory=dict)  # e.g. {"model": {...}, "train": {...}}
    extra: dict = field(default_factory=dict)  # anything the caller saved
    tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # everything in the file
    meta: dict = field(default_factory=dict, repr=False)  # the whole metadata (aliases, optimizer groups, RNG)


def _flatten_model(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """model.state_dict() -> (unique tensors under "model/NAME", aliases {NAME: NAME it shares storage with});
    safetensors refuses tensors sharing memory (tied embeddings), so each is stored once."""
    tensors, aliases, seen = {}, {}, {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[f"model/{name}"] = t.detach().to("cpu", copy=True).contiguous()
    return tensors, aliases


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """optimizer.state_dict() -> (its tensors under "optim/PARAM/KEY", the rest as JSON-able data)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{index}/{key}"] = value.detach().to("cpu", copy=True).contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _rng_state() -> tuple[dict[str, torch.Tensor], list]:
    tensors = {"rng/torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    version, internal, gauss = random.getstate()
    return tensors, [version, list(internal), gauss]


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes, in name order: catches flipped bits in the data."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on every platform
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_chunks(f, data: bytes, chunk: int = 1 << 24) -> None:
    for start in range(0, len(data), chunk):
        f.write(data[start:start + chunk])


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Writes data to path so that path holds either its old content or all of data, never a mix:
    a temporary file in the same folder, flushed and fsynced, then os.replace over path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            _write_chunks(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_folder(path.parent)


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                    step: int = 0, data_generator: torch.Generator | None = None, config: dict | None = None,
                    extra: dict | None = None) -> Path:
    """Saves model (and optimizer, data_generator, the global RNG states, step, config, extra) to one
    safetensors file at path, atomically. config and extra must be JSON-serializable. Returns the path."""
    st = _safetensors()
    tensors, aliases = _flatten_model(model)
    meta = {"format": FORMAT, "step": int(step), "aliases": aliases, "config": config or {}, "extra": extra or {}}
    if optimizer is not None:
        optim_tensors, meta["optimizer"] = _flatten_optimizer(optimizer)
        tensors.update(optim_tensors)
    rng_tensors, meta["python_random"] = _rng_state()
    tensors.update(rng_tensors)
    if data_generator is not None:
        tensors["rng/data"] = data_generator.get_state()
    meta["sha256"] = _digest(tensors)
    try:
        text = json.dumps(meta)
    except TypeError as e:
        raise ValueError(f"save_checkpoint: config and extra must be JSON-serializable ({e})") from e
    data = st.save(tensors, metadata={META_KEY: text})
    atomic_write(path, data)
    return Path(path)


def _read_metadata(path: Path, data: bytes) -> dict:
    """The "nsa" metadata of a safetensors file's bytes; ValueError naming path and the problem."""
    if len(data) < 8:
        raise ValueError(f"checkpoint {path} is corrupt: {len(data)} bytes, too short for a safetensors header")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ValueError(f"checkpoint {path} is corrupt or truncated: its header claims {n} bytes, "
                         f"the file has {len(data) - 8} after the length")
    try:
        header = json.loads(data[8:8 + n])
        meta = json.loads(header["__metadata__"][META_KEY])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"checkpoint {path} is corrupt or not an nsa checkpoint: unreadable header "
                         f"({type(e).__name__}: {e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path} has an unknown format {meta.get('format') if isinstance(meta, dict) else meta!r}; "
                         f"expected {FORMAT!r}")
    return meta


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Reads a checkpoint file without restoring anything: its step, config, extra and tensors (on the CPU)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint {path} is a folder; give the .safetensors file inside it")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    data = path.read_bytes()
    meta = _read_metadata(path, data)
    try:
        tensors = _safetensors().load(data)
    except Exception as e:  # safetensors raises its own SafetensorError
        raise ValueError(f"checkpoint {path} is corrupt or truncated: {type(e).__name__}: {e}") from e
    if meta.get("sha256") != _digest(tensors):
        raise ValueError(f"checkpoint {path} is corrupt: its tensor data does not match the checksum saved with it")
    return Checkpoint(path, int(meta["step"]), meta.get("config", {}), meta.get("extra", {}), tensors, meta)


def _restore_model(ckpt: Checkpoint, model: nn.Module) -> None:
    state = {k[len("model/"):]: v for k, v in ckpt.tensors.items() if k.startswith("model/")}
    for name, target in ckpt.meta.get("aliases", {}).items():
        state[name] = state[target]
    missing = set(model.state_dict()) - set(state)
    unexpected = set(state) - set(model.state_dict())
    if missing or unexpected:
        raise ValueError(f"checkpoint {ckpt.path} does not fit this model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {ckpt.path} does not fit this model: {e}") from e


def _restore_optimizer(ckpt: Checkpoint, optimizer: torch.optim.Optimizer) -> None:
    saved = ckpt.meta.get("optimizer")
    if saved is None:
        raise ValueError(f"checkpoint {ckpt.path} holds no optimizer state")
    state: dict[int, dict] = {}
    for key, value in ckpt.tensors.items():
        if key.startswith("optim/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    for index, entries in saved["scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in saved["param_groups"]]
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"checkpoint {ckpt.path}: its optimizer state does not fit this optimizer: {e}") from e


def _restore_rng(ckpt: Checkpoint) -> None:
    torch.set_rng_state(ckpt.tensors["rng/torch_cpu"])
    cuda = [ckpt.tensors[f"rng/cuda/{i}"] for i in range(len(ckpt.tensors)) if f"rng/cuda/{i}" in ckpt.tensors]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = ckpt.meta["python_random"]
    random.setstate((version, tuple(internal), gauss))


def load_checkpoint(path: str | os.PathLike, model: nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None, *, data_generator: torch.Generator | None = None,
                    restore_rng: bool = True) -> Checkpoint:
    """Reads the checkpoint at path and restores, in place, what is given: model (parameters and buffers),
    optimizer, data_generator and (restore_rng) the global RNGs. Returns the Checkpoint (step, config, extra).

    Raises FileNotFoundError for a missing file and ValueError naming the path for a corrupt or truncated
    file, or one that does not fit the model / optimizer.
    """
    ckpt = read_checkpoint(path)
    if model is not None:
        _restore_model(ckpt, model)
    if optimizer is not None:
        _restore_optimizer(ckpt, optimizer)
    if data_generator is not None:
        if "rng/data" not in ckpt.tensors:
            raise ValueError(f"checkpoint {ckpt.path} holds no data sampler state")
        data_generator.set_state(ckpt.tensors["rng/data"])
    if restore_rng:
        _restore_rng(ckpt)
    return ckpt


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[LanguageModel, dict]:
    """A LanguageModel from an `nsa train` run folder (its checkpoint.safetensors) or a checkpoint file ->
    (model in eval mode, the checkpoint's config)."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.safetensors"
    ckpt = read_checkpoint(path)
    if "model" not in ckpt.config:
        raise ValueError(f"checkpoint {path} holds no model config (was it written by nsa train?)")
    model = LanguageModel(ModelConfig.from_dict(ckpt.config["model"]))
    _restore_model(ckpt, model)
    return model.to(device).eval(), ckpt.config
