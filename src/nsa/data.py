"""Byte-level data: tokenizer, a text corpus split train/validation by file, and a random window sampler.

The default corpus is the Python standard library's own .py files (found at run time, so nothing is
downloaded), capped at DEFAULT_MAX_BYTES. The named corpus PYTHON_ENV ("python-env") is larger: the .py files
of the whole running environment (the standard library and every site-packages folder: hundreds of MB on a
typical ML machine), for GPU runs. Files are taken in a fixed pseudo-random order and every VAL_EVERY-th one
goes to validation, so the split is by file and the same on every run over the same files. Only regular
files are read (FIFOs, sockets, devices and broken symlinks are skipped with a warning), and never
more bytes than the cap has left.
"""
from __future__ import annotations

import codecs
import os
import random
import site
import stat
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .eval import passkey_windows

DEFAULT_MAX_BYTES = 4_000_000
VAL_EVERY = 10  # file k (in the shuffled order) is a validation file when k % VAL_EVERY == 0
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
PYTHON_ENV = "python-env"  # load_corpus's name for the .py files of the running environment


def _as_tensor(data: bytes) -> torch.Tensor:
    if not data:  # frombuffer refuses an empty buffer (a one-byte file has no validation part)
        return torch.zeros(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def encode(text: str) -> torch.Tensor:
    """str -> uint8 [N], its UTF-8 bytes."""
    return _as_tensor(text.encode("utf-8"))


def decode(tokens) -> str:
    """uint8/long tensor or list of ints in [0, 256) -> str (invalid UTF-8 shown as U+FFFD)."""
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.tolist()
    return bytes(tokens).decode("utf-8", errors="replace")


@dataclass
class Corpus:
    train: torch.Tensor  # uint8 [N_train]
    val: torch.Tensor  # uint8 [N_val]
    source: str  # where it came from, for printing
    # where each document (file) starts in train / val: long [n_docs], ascending, first 0; None: one document
    train_starts: torch.Tensor | None = None
    val_starts: torch.Tensor | None = None


def _walk(root: Path, suffix: str | None) -> list[Path]:
    """Files under root (hidden and SKIP_DIRS folders left out), sorted, optionally only those ending in suffix."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith(".")]
        found += [Path(folder, f) for f in files if not f.startswith(".") and (suffix is None or f.endswith(suffix))]
    return sorted(found)


def python_env_roots() -> list[Path]:
    """The folders of the running Python's source: its standard library, then its site-packages folders
    (sysconfig's purelib / platlib and site.getsitepackages()), the existing ones, each once (resolved)."""
    paths = sysconfig.get_paths()
    roots = []
    for folder in (paths["stdlib"], paths["purelib"], paths["platlib"], *site.getsitepackages()):
        root = Path(folder).resolve()
        if root.is_dir() and root not in roots:
            roots.append(root)
    return roots


def _read_text(path: Path, limit: int) -> tuple[bytes | None, bool]:
    """Reads at most `limit` bytes of a regular file -> (them if UTF-8 text without NUL bytes, else None;
    whether the read reached the limit, where a cut character's incomplete tail is dropped).

    Anything but a regular file (FIFO, socket, device, broken symlink) is skipped with a warning, unopened.
    """
    try:
        mode = os.stat(path).st_mode  # follows symlinks
    except FileNotFoundError:
        warnings.warn(f"nsa data: skipping {path}: a broken symlink", stacklevel=3)
        return None, False
    if not stat.S_ISREG(mode):
        warnings.warn(f"nsa data: skipping {path}: not a regular file (a FIFO, socket or device)", stacklevel=3)
        return None, False
    with open(path, "rb") as f:
        data = f.read(limit)
    full = len(data) == limit
    if b"\0" in data:
        return None, full
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        decoder.decode(data, final=not full)  # at the limit the last character may be cut
    except UnicodeDecodeError:
        return None, full
    return data[:len(data) - len(decoder.getstate()[0])], full


def load_corpus(path: str | os.PathLike | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> Corpus:
    """Loads a byte corpus: the stdlib's .py files (path None), the environment's .py files (path "python-env":
    python_env_roots(); a folder of that name is given as ./python-env), one text file, or every text file
    under a folder.

    Several files: split by file (see the module docstring), reading stops once max_bytes are loaded (the
    last file read may be cut short). One file: its first max_bytes, of which 90% train and 10% validate.
    """
    if path is None:
        root = Path(sysconfig.get_paths()["stdlib"])
        files, source = _walk(root, ".py"), f"Python stdlib .py files under {root}"
    elif isinstance(path, str) and path == PYTHON_ENV:
        roots = python_env_roots()  # nested roots walk to the same paths: the set keeps each file once
        files = sorted({f for root in roots for f in _walk(root, ".py")})
        source = f"{PYTHON_ENV}: .py files under {', '.join(map(str, roots))}"
    else:
        root = Path(path)
        if not root.exists():
            raise FileNotFoundError(f"--data: {root} does not exist")
        if not (root.is_dir() or root.is_file()):
            raise ValueError(f"--data: {root} is neither a regular file nor a folder (a FIFO, socket or device?); "
                             "give a text file or a folder of text files")
        files, source = (_walk(root, None), f"text files under {root}") if root.is_dir() else ([root], str(root))

    random.Random(0).shuffle(files)
    texts, total = [], 0
    for f in files:
        data, full = _read_text(f, max_bytes - total)
        if data:
            texts.append(data)
            total += len(data)
        if data is not None and full:  # the cap is reached (but for a character cut at the end)
            break
    if not texts:
        raise ValueError(f"no UTF-8 text found in {source}")

    if len(texts) == 1:
        data = texts[0]
        cut = int(len(data) * 0.9)
        train, val = [data[:cut]], [data[cut:]]
    else:
        train = [t for k, t in enumerate(texts) if k % VAL_EVERY]
        val = [t for k, t in enumerate(texts) if k % VAL_EVERY == 0]
    return Corpus(_as_tensor(b"".join(train)), _as_tensor(b"".join(val)),
                  f"{source} ({len(texts)} file{'s' * (len(texts) != 1)})", _starts(train), _starts(val))


def _starts(docs: list[bytes]) -> torch.Tensor:
    """Offsets of the documents in their concatenation: long [len(docs)] (empty documents left out)."""
    lengths = torch.tensor([0] + [len(d) for d in docs if d], dtype=torch.long)
    return lengths.cumsum(0)[:-1] if len(lengths) > 1 else torch.zeros(1, dtype=torch.long)


def _windows(data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator | None,
             passkey_fraction: float = 0.0, passkey_needles: int = 1) -> tuple[torch.Tensor, ...]:
    """Random windows of seq_len + 1 bytes of data -> (their starts long [B], the windows long [B, seq_len + 1],
    needle_start long [B]: -1 in plain windows, answer_mask bool [B, seq_len + 1]: the answers' bytes).
    passkey_fraction > 0: nsa.eval.passkey_windows mixes passkey samples in (with passkey_needles; more draws from
    generator); 0 draws nothing more."""
    if len(data) <= seq_len:
        raise ValueError(f"seq_len ({seq_len}) must be shorter than the data ({len(data)} bytes); "
                         "use a smaller --seq-len or more data")
    starts = torch.randint(len(data) - seq_len, (batch_size,), generator=generator)
    windows = data[starts[:, None] + torch.arange(seq_len + 1)].long()
    if passkey_fraction > 0:
        return starts, *passkey_windows(windows, passkey_fraction, generator, passkey_needles)
    return (starts, windows, torch.full((batch_size,), -1, dtype=torch.long),
            torch.zeros(batch_size, seq_len + 1, dtype=torch.bool))


def answer_weights(answer_mask: torch.Tensor, answer_weight: float) -> torch.Tensor:
    """Loss weights float [B, seq_len] of a batch's targets from answer_mask bool [B, seq_len + 1] (its windows'
    answer bytes): answer_weight on the targets that are answer bytes, 1 elsewhere."""
    return 1.0 + (answer_weight - 1.0) * answer_mask[:, 1:].float()


def get_batch(data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator | None = None,
              device: str | torch.device = "cpu", passkey_fraction: float = 0.0,
              answer_weight: float | None = None, passkey_needles: int = 1) -> tuple[torch.Tensor, ...]:
    """Random windows of data (uint8 [N]): inputs x and next-byte targets y, long [batch_size, seq_len].
    passkey_fraction: the share of windows that are passkey samples (nsa.eval.passkey_windows, with
    passkey_needles), on average. answer_weight given: a third tensor, the loss weights float [batch_size, seq_len]
    (answer_weights)."""
    _, window, _, answer_mask = _windows(data, batch_size, seq_len, generator, passkey_fraction,
                                         passkey_needles)  # [B, seq_len + 1]
    batch = window[:, :-1].to(device), window[:, 1:].to(device)
    if answer_weight is None:
        return batch
    return *batch, answer_weights(answer_mask, answer_weight).to(device)


def get_packed_batch(data: torch.Tensor, starts: torch.Tensor | None, batch_size: int, seq_len: int,
                     generator: torch.Generator | None = None, device: str | torch.device = "cpu",
                     passkey_fraction: float = 0.0, answer_weight: float | None = None,
                     passkey_needles: int = 1) -> tuple[torch.Tensor, ...]:
    """get_batch's windows (the same draws from generator), each split at document boundaries into packed
    sequences: x, y long [1, batch_size * seq_len] and cu_seqlens int32 [N + 1] (FlashAttention's convention).

    starts: long [n_docs], where each document starts in data (None: one document). No sequence crosses a
    document boundary, so with cu_seqlens no token attends across documents; a target that is the first byte
    of the next document is set to -100 (cross_entropy's ignore_index): nothing is predicted across documents.
    passkey_fraction and passkey_needles as in get_batch; a passkey sample is one sequence (its filler may span documents: the
    sample is one document, as the prompts of nsa.eval are). answer_weight given: a fourth tensor, the loss
    weights float [1, batch_size * seq_len] (answer_weights; 0 where the target is ignored).
    """
    window_starts, window, needle_start, answer_mask = _windows(data, batch_size, seq_len, generator,
                                                                passkey_fraction, passkey_needles)
    x, y = window[:, :-1], window[:, 1:]
    cuts = [torch.zeros(1, dtype=torch.long)]
    ignore = torch.zeros(batch_size, seq_len, dtype=torch.bool)
    if starts is not None and len(starts):
        for b, s in enumerate(window_starts.tolist()):
            if needle_start[b] >= 0:
                cuts.append(torch.tensor([(b + 1) * seq_len]))
                continue
            lo = int(torch.searchsorted(starts, s, right=True))
            hi = int(torch.searchsorted(starts, s + seq_len, right=True))
            k = starts[lo:hi] - s  # documents starting at window positions 1 .. seq_len
            ignore[b, k - 1] = True  # the target of position k - 1 is a new document's first byte
            inner = k[k < seq_len]
            cuts.append(b * seq_len + inner)
            cuts.append(torch.tensor([(b + 1) * seq_len]))
    else:
        cuts.append(torch.arange(1, batch_size + 1) * seq_len)
    cu_seqlens = torch.cat(cuts).to(torch.int32)
    y = y.masked_fill(ignore, -100)
    batch = x.reshape(1, -1).to(device), y.reshape(1, -1).to(device), cu_seqlens.to(device)
    if answer_weight is None:
        return batch
    weights = answer_weights(answer_mask, answer_weight).masked_fill(ignore, 0.0)
    return *batch, weights.reshape(1, -1).to(device)
