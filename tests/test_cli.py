"""`nsa demo` end to end on a tiny text file, and the data loading and schedule it relies on."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nsa
from nsa import LanguageModel, ModelConfig
from nsa.cli import main
from nsa.data import Corpus, decode, encode, get_batch, load_corpus
from nsa.train import TrainConfig, lr_at, train

TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i * i}  # é\n" for i in range(120))


def test_demo_trains_both_models_and_saves_the_plot(tmp_path, capsys):
    data = tmp_path / "tiny.txt"
    data.write_text(TEXT)
    out = tmp_path / "plots" / "loss.png"
    assert main(["demo", "--steps", "4", "--seq-len", "64", "--batch-size", "2", "--device", "cpu",
                 "--data", str(data), "--out", str(out), "--sample-len", "8"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    for text in ("nsa: train", "full: train", "sample from nsa", "sample from full", f"loss plot saved to {out}",
                 "4 steps of 2 x 64 bytes"):
        assert text in printed, text


def test_encode_decode_round_trip():
    tokens = encode("naïve → bytes")
    assert tokens.dtype == torch.uint8 and len(tokens) == len("naïve → bytes".encode())
    assert decode(tokens) == "naïve → bytes"


def test_folder_is_split_by_file_deterministically(tmp_path):
    for i in range(25):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"<file {i:02d}>" + "x" * 50)
    (tmp_path / "image.bin").write_bytes(b"\x00\x01<file binary>")  # not text: skipped
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "secret.txt").write_text("<file hidden>")  # hidden folder: skipped
    corpus = load_corpus(tmp_path)
    train, val = decode(corpus.train), decode(corpus.val)
    train_files = {train[k:k + 9] for k in range(0, len(train), 59)}
    val_files = {val[k:k + 9] for k in range(0, len(val), 59)}
    assert len(train_files) + len(val_files) == 25 and not train_files & val_files
    assert len(val_files) == 3  # files 0, 10 and 20 of the fixed shuffled order
    again = load_corpus(tmp_path)
    assert torch.equal(again.train, corpus.train) and torch.equal(again.val, corpus.val)


def test_default_corpus_is_the_stdlib_capped():
    corpus = load_corpus(max_bytes=100_000)
    assert "stdlib" in corpus.source
    assert 100_000 - 4 < len(corpus.train) + len(corpus.val) <= 100_000  # the file crossing the cap is cut there
    assert len(corpus.val) > 0 and b"import" in bytes(corpus.train.tolist())


def test_get_batch_targets_are_the_next_bytes():
    data = encode(TEXT)
    x, y = get_batch(data, 4, 32, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x, y):  # every window is a stretch of the data
        assert bytes(torch.cat([row_x, row_y[-1:]]).tolist()) in TEXT.encode()


def test_learning_rate_schedule():
    cfg = TrainConfig(steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4) and lr_at(9, cfg) == pytest.approx(1e-3)  # linear warmup
    assert lr_at(10, cfg) == pytest.approx(1e-3) and lr_at(99, cfg) == pytest.approx(1e-4)  # cosine down to 10%
    assert lr_at(10, cfg) > lr_at(50, cfg) > lr_at(90, cfg)
    assert lr_at(99, TrainConfig(steps=100, lr=1e-3, warmup_steps=10, schedule="constant")) == 1e-3


def test_demo_reports_where_the_png_really_is(tmp_path, capsys):
    data = tmp_path / "tiny.txt"
    data.write_text(TEXT)
    assert main(["demo", "--steps", "2", "--seq-len", "64", "--batch-size", "2", "--device", "cpu",
                 "--data", str(data), "--out", str(tmp_path / "curves"), "--sample-len", "4"]) == 0
    png = tmp_path / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"loss plot saved to {png}" in capsys.readouterr().out


def demo_args(data, out):
    return ["demo", "--steps", "2", "--seq-len", "64", "--batch-size", "2", "--device", "cpu", "--data", str(data),
            "--out", str(out), "--sample-len", "4"]


@pytest.fixture
def no_training(monkeypatch):
    """Makes training fail loudly: argument errors must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("training started")
    monkeypatch.setattr("nsa.cli.train", refuse)


def test_out_is_checked_before_training(tmp_path, no_training):
    data = tmp_path / "tiny.txt"
    data.write_text(TEXT)
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "plain").write_text("a file, not a folder")
    cases = [(tmp_path, "is a folder"), (tmp_path / "folder.png", "is a folder"),
             (tmp_path / "plain" / "loss.png", "is not a folder")]
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        cases.append((locked / "sub" / "loss.png", "not writable"))
    for out, words in cases:
        with pytest.raises(ValueError, match=f"--out: .*{words}"):
            main(demo_args(data, out))


@pytest.mark.parametrize("module", ["tqdm", "matplotlib", "safetensors"])
def test_missing_cli_extra_exits_with_the_install_command(module, tmp_path, monkeypatch, capsys, no_training):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    with pytest.raises(SystemExit) as info:
        main(demo_args(tmp_path / "tiny.txt", tmp_path / "loss.png"))
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert module in err and 'pip install "nsa[cli]"' in err


def test_train_progress_bar_needs_tqdm(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    corpus = load_corpus_from_text(TEXT)
    model = LanguageModel(ModelConfig(n_layer=1, n_embd=16, n_head=2, n_kv_head=1, attention="full"))
    cfg = TrainConfig(steps=1, batch_size=1, seq_len=16, eval_every=1, eval_batches=1)
    with pytest.raises(ModuleNotFoundError, match=r'pip install "nsa\[cli\]"'):
        train({"full": model}, corpus, cfg)
    assert len(train({"full": model}, corpus, cfg, progress=False)["full"].train_loss) == 1


def load_corpus_from_text(text):
    data = encode(text)
    return Corpus(data[:3000], data[3000:], "text")


BLOCK_CLI_DEPS = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tqdm", "matplotlib"):
            raise ImportError(f"blocked: {name}")
sys.meta_path.insert(0, Block())
import nsa, nsa.cache, nsa.data, nsa.graph, nsa.layer, nsa.model, nsa.ops, nsa.train, nsa.cli
assert not {"tqdm", "matplotlib"} & set(sys.modules), sorted(sys.modules)
"""


def test_library_imports_without_the_cli_extra():
    src = Path(nsa.__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", BLOCK_CLI_DEPS], check=True, env=env, timeout=300)


def test_ci_runs_the_readme_test_command():
    root = Path(__file__).resolve().parent.parent
    readme, ci = (root / "README.md").read_text(), (root / ".ci" / "run").read_text()
    command = re.search(r"```bash\n(.*pytest.*)\n```", readme).group(1)
    assert command in ci.splitlines() and '".[test]"' in command
    assert '-e ".[cli]"' in re.search(r"```bash\n(.*nsa demo)\n```", readme).group(1)
