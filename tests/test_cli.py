"""`nsa demo` end to end on a tiny text file, and the data loading and schedule it relies on."""
import pytest
import torch

from nsa.cli import main
from nsa.data import decode, encode, get_batch, load_corpus
from nsa.train import TrainConfig, lr_at

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
