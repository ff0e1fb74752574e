"""Packed documents: windows split at file boundaries into sequences with cu_seqlens, nothing crossing a document."""
import pytest
import torch

from nsa.data import get_batch, get_packed_batch, load_corpus


@pytest.fixture
def corpus(tmp_path):
    for i in range(23):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"<{i:02d}>" + chr(ord("a") + i) * (5 + 7 * i))
    return load_corpus(tmp_path)


def test_corpus_records_where_each_file_starts(corpus):
    for data, starts in ((corpus.train, corpus.train_starts), (corpus.val, corpus.val_starts)):
        text = bytes(data.tolist())
        assert starts.tolist() == [k for k in range(len(text)) if text[k:k + 1] == b"<"]
    assert len(corpus.train_starts) + len(corpus.val_starts) == 23


def test_packed_batch_splits_windows_at_document_boundaries(corpus):
    data, starts = corpus.train, corpus.train_starts
    B, L = 6, 40
    x, y, cu = get_packed_batch(data, starts, B, L, torch.Generator().manual_seed(3))
    x_plain, y_plain = get_batch(data, B, L, torch.Generator().manual_seed(3))
    assert torch.equal(x, x_plain.reshape(1, -1))  # the same windows, the same generator draws
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == B * L and (cu.diff() > 0).all()
    assert set(range(0, B * L + 1, L)) <= set(cu.tolist())  # windows stay apart
    doc = torch.bucketize(torch.arange(len(data)), starts, right=True)  # document id of every byte
    window_starts = torch.randint(len(data) - L, (B,), generator=torch.Generator().manual_seed(3))
    pos = (window_starts[:, None] + torch.arange(L)).reshape(-1)  # byte position of every input token
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        assert len(set(doc[pos[a:b]].tolist())) == 1  # one document per sequence
    crossing = doc[pos + 1] != doc[pos]  # the target is the next document's first byte
    assert crossing.any()
    assert torch.equal(y[0] == -100, crossing)
    assert torch.equal(y[0][~crossing], y_plain.reshape(-1)[~crossing])


def test_packed_training_run(tmp_path, corpus):
    pytest.importorskip("safetensors")
    from nsa import ModelConfig, NSAConfig
    from nsa.train import TrainConfig, read_metrics, train_run
    model_cfg = ModelConfig(n_layer=1, n_embd=16, n_head=2, n_kv_head=1, backend="reference",
                            nsa=NSAConfig(cmp_block=8, cmp_stride=4, slc_block=8, num_selected=2, window=8))
    train_cfg = TrainConfig(steps=3, batch_size=2, seq_len=32, eval_every=3, eval_batches=1, packed=True)
    train_run(tmp_path / "run", model_cfg, train_cfg, corpus=corpus, progress=False)
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [0, 1, 2, 3] and all(r.get("loss", 1) > 0 for r in records)
