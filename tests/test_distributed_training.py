"""Scale-out on torch.distributed, in gloo processes spawned by the test: the NSA layer under context parallelism
against the single-process layer, and `nsa train` (train_run) with DDP, FSDP2 and DDP + context parallelism
against one process on the same global batch (same loss curve, to float tolerance), with a distributed
checkpoint resumed on another world size."""
import pytest
import torch
import torch.distributed as dist

from nsa import NSAConfig, NativeSparseAttention
from nsa.distributed import ContextParallelLayout, shard, unshard

from dist_utils import spawn

# n = 4 of up to ~10 blocks: besides the three forced blocks (0, J - 1, J) one is chosen by its score
CONFIG = NSAConfig(cmp_block=8, cmp_stride=4, slc_block=8, num_selected=4, window=12)


def _layer_cp_matches_single_process(rank, world_size):
    for share_kv, case in ((False, dict(seq_len=45, batch=2)), (True, dict(seq_lens=[30, 7, 41]))):
        torch.manual_seed(0)
        layer = NativeSparseAttention(32, 4, 2, 8, config=CONFIG, share_kv=share_kv, backend="reference").double()
        T = case.get("seq_len") or sum(case["seq_lens"])
        x = torch.randn(case.get("batch", 1), T, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        cu = None if "seq_lens" not in case else torch.tensor([0] + case["seq_lens"]).cumsum(0).to(torch.int32)
        xg = x.clone().requires_grad_()
        y = layer(xg, cu_seqlens=cu)
        dy = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(2))
        grads = torch.autograd.grad(y, [xg, *layer.parameters()], dy)

        layout = ContextParallelLayout(CONFIG, **case)
        x_local = shard(x, layout).requires_grad_()
        y_local = layer(x_local, context_parallel=layout)
        local_grads = torch.autograd.grad(y_local, [x_local, *layer.parameters()], shard(dy, layout))
        torch.testing.assert_close(y_local, shard(y, layout), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(unshard(y_local.detach(), layout), y.detach(), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(local_grads[0], shard(grads[0], layout), rtol=1e-10, atol=1e-10)
        for (name, _), g, g_full in zip(layer.named_parameters(), local_grads[1:], grads[1:]):
            dist.all_reduce(g)  # each rank's parameter gradients cover its own queries: their sum is the whole
            torch.testing.assert_close(g, g_full, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")


def test_layer_under_context_parallelism_equals_the_single_process_layer():
    spawn(_layer_cp_matches_single_process, 2)  # dense with three K/V sets, packed with one shared pair


# ---- training ----

def _model_and_train_configs(**train):
    from nsa import ModelConfig
    from nsa.train import TrainConfig
    model_cfg = ModelConfig(n_layer=2, n_embd=16, n_head=2, n_kv_head=1, backend="reference", nsa=CONFIG)
    train_cfg = TrainConfig(**{**dict(steps=4, batch_size=4, seq_len=32, warmup_steps=1, eval_every=2, eval_batches=1,
                                      checkpoint_every=2), **train})
    return model_cfg, train_cfg


def _train(rank, world_size, corpus_dir, runs):
    """runs: (run folder, train overrides, stop_at), trained one after the other by this group; overrides None:
    resume the folder."""
    from nsa.data import load_corpus
    from nsa.train import train_run
    corpus = load_corpus(corpus_dir)
    for run_dir, train, stop_at in runs:
        if train is None:
            train_run(run_dir, resume=True, stop_at=stop_at, progress=False, corpus=corpus)
        else:
            train_run(run_dir, *_model_and_train_configs(**train), stop_at=stop_at, progress=False, corpus=corpus)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus")
    for i in range(12):
        (path / f"doc{i:02d}.txt").write_text(f"<{i:02d}> " + "the quick brown fox jumps. " * (3 + i))
    return path


def _losses(run_dir):
    from nsa.train import read_metrics
    records = read_metrics(run_dir)
    return [r.get("loss") for r in records], [r["val_loss"] for r in records if "val_loss" in r]


def test_ddp_fsdp_and_context_parallel_training_follow_one_process_and_resume_on_another_world(tmp_path,
                                                                                             corpus_dir):
    runs = {"ddp": dict(parallel="ddp"), "fsdp": dict(parallel="fsdp"),  # dense batches, split over 2 dp ranks
            "ddp_cp": dict(parallel="ddp", context_parallel=2, packed=True),  # packed, over 2 cp ranks
            "fsdp_cp": dict(parallel="fsdp", context_parallel=2)}
    _train(0, 1, corpus_dir, [(tmp_path / "one", {}, None), (tmp_path / "one_packed", dict(packed=True), None)])
    # the 2-process group also trains an FSDP2 run that stops after step 2, resumed below by one process
    spawn(_train, 2, corpus_dir, [(tmp_path / name, train, None) for name, train in runs.items()]
          + [(tmp_path / "stopped", dict(parallel="fsdp"), 2)])
    for name, train in runs.items():
        train_loss, val_loss = _losses(tmp_path / name)
        expected = _losses(tmp_path / ("one_packed" if train.get("packed") else "one"))
        assert train_loss[0] is None and len(train_loss) == 5, name
        torch.testing.assert_close(train_loss[1:], expected[0][1:], rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(val_loss, expected[1], rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")

    assert (tmp_path / "stopped" / "checkpoint" / "meta.json").exists()
    assert len(_losses(tmp_path / "stopped")[0]) == 3
    spawn(_train, 1, corpus_dir, [(tmp_path / "stopped", None, None)])  # the 2-rank checkpoint, on 1 rank
    resumed, whole = _losses(tmp_path / "stopped"), _losses(tmp_path / "fsdp")
    torch.testing.assert_close(resumed[0][1:], whole[0][1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(resumed[1], whole[1], rtol=1e-5, atol=1e-5)


def test_weighted_passkey_loss_over_ranks_is_the_one_process_loss(tmp_path, corpus_dir):
    """The passkey mix's answer weights (train.passkey_answer_weight) split over dp ranks and cp shards like the
    targets: each rank's share of the weighted mean sums to the one-process loss."""
    mix = dict(seq_len=96, steps=2, passkey_fraction=1.0, passkey_needles=1, passkey_answer_weight=5.0)
    runs = {"ddp": dict(mix, parallel="ddp"), "ddp_cp": dict(mix, parallel="ddp", context_parallel=2, packed=True)}
    _train(0, 1, corpus_dir, [(tmp_path / "one", mix, None), (tmp_path / "one_packed", dict(mix, packed=True), None)])
    spawn(_train, 2, corpus_dir, [(tmp_path / name, train, None) for name, train in runs.items()])
    for name, train in runs.items():
        expected = _losses(tmp_path / ("one_packed" if train.get("packed") else "one"))
        torch.testing.assert_close(_losses(tmp_path / name)[0][1:], expected[0][1:], rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")
