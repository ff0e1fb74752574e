"""Checkpoints: exact round trip, atomic writes, clear errors, and a resumed run bitwise equal to an uninterrupted one."""
import json
import random

import pytest
import torch

pytest.importorskip("safetensors")

import nsa.checkpoint as checkpoint
import nsa.train
from nsa import LanguageModel, ModelConfig, NSAConfig
from nsa.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from nsa.data import Corpus, encode
from nsa.train import CHECKPOINT_FILE, TrainConfig, make_optimizer, read_metrics, train_run

NSA = NSAConfig(cmp_block=8, cmp_stride=4, slc_block=8, num_selected=2, window=8)
TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(150))


def tiny_model(seed=0, attention="nsa"):
    torch.manual_seed(seed)
    return LanguageModel(ModelConfig(n_layer=1, n_embd=16, n_head=2, n_kv_head=1, nsa=NSA, attention=attention,
                                     backend="reference" if attention == "nsa" else None))


def trained(seed=0):
    model = tiny_model(seed)
    opt = make_optimizer(model, TrainConfig())
    idx = torch.randint(0, 256, (2, 17))
    for _ in range(2):
        opt.zero_grad()
        model(idx[:, :-1], idx[:, 1:])[1].backward()
        opt.step()
    return model, opt


def test_round_trip_is_exact(tmp_path):
    model, opt = trained()
    gen = torch.Generator().manual_seed(5)
    torch.randint(0, 10, (3,), generator=gen)
    path = save_checkpoint(tmp_path / "c.safetensors", model, opt, step=7, data_generator=gen,
                           config={"a": [1, 2]}, extra={"note": "x"})
    expected_cpu, expected_py = torch.get_rng_state(), random.getstate()
    torch.rand(5), random.random()  # move the global RNGs on

    other, other_opt = trained(seed=1)
    gen2 = torch.Generator()
    ckpt = load_checkpoint(path, other, other_opt, data_generator=gen2)
    assert (ckpt.step, ckpt.config, ckpt.extra) == (7, {"a": [1, 2]}, {"note": "x"})
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    assert other.lm_head.weight is other.embed.weight  # tied weights stay tied
    sa, sb = opt.state_dict(), other_opt.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for i in sa["state"]:
        for key in sa["state"][i]:
            assert torch.equal(sa["state"][i][key], sb["state"][i][key]), (i, key)
    assert torch.equal(gen2.get_state(), gen.get_state())
    assert torch.equal(torch.get_rng_state(), expected_cpu) and random.getstate() == expected_py


def test_interrupted_write_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    model, opt = trained()
    path = save_checkpoint(tmp_path / "c.safetensors", model, opt, step=1)
    before = path.read_bytes()

    def half_then_crash(f, data, chunk=0):
        f.write(data[:len(data) // 2])
        raise KeyboardInterrupt("killed while saving")
    monkeypatch.setattr(checkpoint, "_write_chunks", half_then_crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, opt, step=2)
    assert path.read_bytes() == before and load_checkpoint(path, tiny_model(), restore_rng=False).step == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # the temporary file is gone


def test_missing_and_corrupt_files_give_clear_errors(tmp_path):
    model, opt = trained()
    missing = tmp_path / "none.safetensors"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_checkpoint(missing, model)
    path = save_checkpoint(tmp_path / "c.safetensors", model, opt, step=3)
    data = path.read_bytes()
    cases = {"short": data[:5], "truncated": data[:len(data) - 100], "header": data[:8] + b"[" + data[9:],
             "flipped": data[:-3] + bytes([data[-3] ^ 1]) + data[-2:],
             "garbage": b"\xff" * 64}
    for name, content in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(content)
        with pytest.raises(ValueError, match=f"{bad}.*(corrupt|truncated)"):
            load_checkpoint(bad, model)
    with pytest.raises(ValueError, match="does not fit this model"):
        load_checkpoint(path, tiny_model(attention="full"))
    with pytest.raises(ValueError, match="is a folder"):
        load_checkpoint(tmp_path, model)


def corpus():
    data = encode(TEXT)
    return Corpus(data[:4000], data[4000:], "text")


def run_cfgs(**kwargs):
    model_cfg = ModelConfig(n_layer=1, n_embd=16, n_head=2, n_kv_head=1, nsa=NSA, backend="reference")
    return model_cfg, TrainConfig(steps=6, batch_size=2, seq_len=24, warmup_steps=2, eval_every=2, eval_batches=1,
                                  checkpoint_every=4, **kwargs)


def test_resume_equals_an_uninterrupted_run_bitwise(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    train_run(full, *run_cfgs(), corpus=corpus(), progress=False)
    train_run(part, *run_cfgs(), corpus=corpus(), progress=False, stop_at=3)
    assert read_checkpoint(part / CHECKPOINT_FILE).step == 3
    torch.manual_seed(123), random.seed(123)  # a new process would start from other RNG states
    train_run(part, resume=True, corpus=corpus(), progress=False)
    a, b = read_checkpoint(full / CHECKPOINT_FILE), read_checkpoint(part / CHECKPOINT_FILE)
    assert a.step == b.step == 6
    assert a.tensors.keys() == b.tensors.keys()
    for key in a.tensors:
        assert torch.equal(a.tensors[key], b.tensors[key]), key
    strip = lambda records: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]
    assert strip(read_metrics(full)) == strip(read_metrics(part))
    assert [r["step"] for r in read_metrics(part)] == list(range(7))
    assert json.loads((full / "config.json").read_text())["train"]["steps"] == 6


def test_a_run_that_crashed_after_a_periodic_checkpoint_resumes_bitwise(tmp_path, monkeypatch):
    # the checkpoint of step 4 is written while the batch of step 5 is already drawn (built ahead on the host): it
    # must keep the sampler as it was before that draw
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    train_run(full, *run_cfgs(), corpus=corpus(), progress=False)
    lr_at = nsa.train.lr_at

    def crash_at_the_sixth_step(step, cfg):
        if step == 5:
            raise KeyboardInterrupt
        return lr_at(step, cfg)
    monkeypatch.setattr(nsa.train, "lr_at", crash_at_the_sixth_step)
    with pytest.raises(KeyboardInterrupt):
        train_run(crashed, *run_cfgs(), corpus=corpus(), progress=False)
    monkeypatch.setattr(nsa.train, "lr_at", lr_at)
    assert read_checkpoint(crashed / CHECKPOINT_FILE).step == 4
    train_run(crashed, resume=True, corpus=corpus(), progress=False)
    a, b = read_checkpoint(full / CHECKPOINT_FILE), read_checkpoint(crashed / CHECKPOINT_FILE)
    for key in a.tensors:
        assert torch.equal(a.tensors[key], b.tensors[key]), key


def test_resume_drops_metrics_after_the_checkpoint_and_new_runs_refuse_a_used_folder(tmp_path):
    run = tmp_path / "run"
    train_run(run, *run_cfgs(), corpus=corpus(), progress=False, stop_at=4)
    with open(run / "metrics.jsonl", "a") as f:  # steps logged after the checkpoint, then a crash mid-line
        f.write(json.dumps({"step": 5, "loss": 1.0}) + "\n" + '{"step": 6, "lo')
    train_run(run, resume=True, corpus=corpus(), progress=False)
    assert [r["step"] for r in read_metrics(run)] == list(range(7))
    with pytest.raises(ValueError, match="already holds a run"):
        train_run(run, *run_cfgs(), corpus=corpus(), progress=False)
