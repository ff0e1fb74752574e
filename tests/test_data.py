"""load_corpus reads only regular files, never more than its byte cap, and never blocks on FIFOs or devices;
the python-env corpus (the environment's .py files) splits by file."""
import contextlib
import os
import signal
import socket
import sysconfig
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from nsa.data import decode, load_corpus, python_env_roots

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")


@contextlib.contextmanager
def must_finish_within(seconds):
    """Fails (instead of hanging the suite) when the body blocks, e.g. opening a FIFO without a writer."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def fail(*_):
        raise TimeoutError(f"did not finish within {seconds} s")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def text_folder(tmp_path, n=3):
    for i in range(n):
        (tmp_path / f"doc{i}.txt").write_text(f"<file {i}> " + "text " * 20)
    return tmp_path


@needs_fifo
def test_fifo_in_a_folder_is_skipped_with_a_warning(tmp_path):
    os.mkfifo(text_folder(tmp_path) / "pipe")
    with must_finish_within(20), pytest.warns(UserWarning, match="skipping .*pipe.*not a regular file"):
        corpus = load_corpus(tmp_path)
    assert "3 files" in corpus.source


@needs_fifo
def test_data_path_that_is_a_fifo_is_a_clear_error(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    with must_finish_within(20), pytest.raises(ValueError, match="--data: .*pipe is neither a regular file nor a folder"):
        load_corpus(tmp_path / "pipe")


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_devices_are_never_read(tmp_path):
    (text_folder(tmp_path) / "zeros").symlink_to("/dev/zero")  # reading it whole was a MemoryError
    with must_finish_within(20), pytest.warns(UserWarning, match="skipping .*zeros.*not a regular file"):
        assert "3 files" in load_corpus(tmp_path).source
    with pytest.raises(ValueError, match="--data: /dev/zero is neither a regular file nor a folder"):
        load_corpus("/dev/zero")


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="needs Unix sockets")
def test_sockets_and_broken_symlinks_are_skipped(tmp_path):
    text_folder(tmp_path)
    (tmp_path / "gone").symlink_to(tmp_path / "missing.txt")
    with tempfile.TemporaryDirectory() as short:  # socket paths must be short
        server = socket.socket(socket.AF_UNIX)
        try:
            server.bind(os.path.join(short, "sock"))
            (tmp_path / "sock").symlink_to(os.path.join(short, "sock"))
            with pytest.warns(UserWarning) as warned:
                corpus = load_corpus(tmp_path)
        finally:
            server.close()
    messages = " ".join(str(w.message) for w in warned)
    assert "gone: a broken symlink" in messages and "sock: not a regular file" in messages
    assert "3 files" in corpus.source


def test_reads_no_more_than_the_cap(tmp_path, monkeypatch):
    big = tmp_path / "big.txt"
    big.write_text("a" * 10_000)
    sizes = []
    real_open = open

    class Recording:  # records every read size asked of the file
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def read(self, n=-1):
            sizes.append(n)
            return self.f.read(n)

    monkeypatch.setattr("builtins.open", lambda *a, **k: Recording(real_open(*a, **k)))
    corpus = load_corpus(big, max_bytes=1000)
    assert len(corpus.train) + len(corpus.val) == 1000 and sizes == [1000]


def test_folder_stops_at_the_cap_mid_file(tmp_path):
    for i in range(20):
        (tmp_path / f"doc{i:02d}.txt").write_text("x" * 100)
    corpus = load_corpus(tmp_path, max_bytes=250)
    assert len(corpus.train) + len(corpus.val) == 250 and "3 files" in corpus.source


def test_character_cut_by_the_cap_is_dropped(tmp_path):
    path = tmp_path / "accents.txt"
    path.write_text("é" * 100)  # 2 bytes each
    corpus = load_corpus(path, max_bytes=51)  # used to be rejected as invalid UTF-8 (or kept half a character)
    loaded = bytes(corpus.train.tolist() + corpus.val.tolist())
    assert loaded == "é".encode() * 25


@settings(max_examples=60, deadline=None)
@given(text=st.text(min_size=1, max_size=40).filter(lambda t: "\0" not in t), cap=st.integers(1, 200))
def test_loaded_bytes_are_the_longest_valid_prefix_within_the_cap(text, cap):
    data = text.encode()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "t.txt")
        path.write_bytes(data)
        if len(data[:cap].decode("utf-8", errors="ignore").encode()) == 0:
            with pytest.raises(ValueError, match="no UTF-8 text"):
                load_corpus(path, max_bytes=cap)
            return
        corpus = load_corpus(path, max_bytes=cap)
    loaded = bytes(corpus.train.tolist() + corpus.val.tolist())
    assert data.startswith(loaded) and len(loaded) <= cap
    assert len(loaded) > min(len(data), cap) - 4  # at most the cut character is dropped
    decode(loaded)
    loaded.decode("utf-8")  # valid UTF-8


def test_one_byte_file_loads(tmp_path):
    (tmp_path / "one.txt").write_text("x")  # its validation part is empty: used to fail in torch.frombuffer
    corpus = load_corpus(tmp_path / "one.txt")
    assert len(corpus.train) + len(corpus.val) == 1


def test_python_env_corpus_splits_by_file(tmp_path, monkeypatch):
    stdlib, site_packages = tmp_path / "lib" / "python3", tmp_path / "lib" / "python3" / "site-packages"
    for k, folder in enumerate((stdlib / "json", site_packages / "pkg", site_packages / "pkg" / "__pycache__")):
        folder.mkdir(parents=True)
        for i in range(12):
            (folder / f"m{i:02d}.py").write_text(f"#<{k}-{i:02d}>\n" + "x = 1\n" * 5)
    (site_packages / "pkg" / "notes.txt").write_text("#<not python>\n")
    # the site-packages folder sits inside the stdlib's too: each file must still count once
    monkeypatch.setattr("nsa.data.python_env_roots", lambda: [stdlib, site_packages])
    corpus = load_corpus("python-env")
    files = {}
    for split in ("train", "val"):
        text = decode(getattr(corpus, split))
        files[split] = [text[s:s + 7] for s in getattr(corpus, f"{split}_starts").tolist()]
        assert all(name.startswith("#<") and name.endswith(">") for name in files[split])
    every = files["train"] + files["val"]
    assert sorted(every) == sorted(f"#<{k}-{i:02d}>" for k in (0, 1) for i in range(12))  # each file once, no cache
    assert not set(files["train"]) & set(files["val"]) and len(files["val"]) == 3
    again = load_corpus("python-env")
    assert torch.equal(again.train, corpus.train) and torch.equal(again.val, corpus.val)
    assert corpus.source.startswith("python-env") and "24 files" in corpus.source


def test_python_env_corpus_reads_the_standard_library_and_site_packages():
    roots = python_env_roots()
    assert Path(sysconfig.get_paths()["stdlib"]).resolve() in roots
    assert Path(torch.__file__).resolve().parent.parent in roots  # the site-packages holding torch
    corpus = load_corpus("python-env", max_bytes=50_000)
    assert 50_000 - 4 < len(corpus.train) + len(corpus.val) <= 50_000 and corpus.source.startswith("python-env")
