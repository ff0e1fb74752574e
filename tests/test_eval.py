"""Passkey evaluation: prompt layout, the scorer, the training mix, and an end-to-end run on a tiny model through the
CLI."""
import json
import math
from dataclasses import replace
from unittest import mock

import pytest
import torch

pytest.importorskip("safetensors")

from nsa import LanguageModel, ModelConfig, NSAConfig
from nsa.checkpoint import load_model, save_checkpoint
from nsa.cli import main
from nsa.data import decode, encode, get_batch, get_packed_batch
from nsa.eval import (ANSWER, NEEDLE, QUESTION, block_chance, copy_source_hits, digits_right, make_prompt,
                      passkey_grid, passkey_min_length, passkey_windows, repeat_loss, score_answer)
from nsa.train import TrainConfig, config_dict

FILLER = encode("".join(f"line {i} of some filler text\n" for i in range(100)))


@pytest.mark.parametrize("length", [80, 200, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_prompt_puts_the_key_at_the_depth_and_length(length, depth):
    p = make_prompt(FILLER, length, depth, "48213", offset=17)
    text = bytes(p.tokens.tolist()).decode()
    needle = NEEDLE.format(key="48213")
    assert len(p.tokens) == length and p.tokens.dtype == torch.long
    assert text.endswith(QUESTION) and text.count("48213") == 1
    assert text.index(needle) == p.needle_start
    filler_len = length - len(needle) - len(QUESTION)
    assert p.needle_start == round(depth * filler_len)
    rest = text[:p.needle_start] + text[p.needle_start + len(needle):-len(QUESTION)]
    assert rest.encode() in bytes(FILLER.tolist()) * 3  # the filler, in order, from the offset (wrapping)
    with pytest.raises(ValueError, match="too short"):
        make_prompt(FILLER, 40, depth, "48213")


def test_scorer_accepts_exactly_the_right_digits():
    for answer in (" 48213", "48213", " 48213. Rem", "  48213\n"):
        assert score_answer(answer, "48213"), answer
    for answer in (" 4821", " 482134", " 48231", "", " x48213", " 4821.3", " 048213"):
        assert not score_answer(answer, "48213"), answer


def test_digits_right_counts_the_key_digits_at_their_places():
    assert digits_right(" 48213.", "48213") == 5
    assert digits_right(" 48299. x", "48213") == 3  # 4, 8, 2 at their places
    assert digits_right(" 84213", "48213") == 3  # the first two swapped
    assert digits_right(" 4821", "48213") == 4 and digits_right(" 482134", "48213") == 5
    assert digits_right(" x48213", "48213") == 0 and digits_right("", "48213") == 0


def test_grid_digit_accuracy_is_the_share_of_key_digits_answered():
    class Answers(torch.nn.Module):
        """Answers every prompt with " 48213." whatever it holds (no attention layers: no selection statistics)."""
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(()))
            self.blocks = torch.nn.ModuleList()

        def generate(self, idx, n, temperature):
            return torch.cat([idx, torch.tensor(list(b" 48213."))[:n].expand(idx.shape[0], -1)], 1)
    results = passkey_grid(Answers(), FILLER, [200], [0.0, 0.5], trials=4)
    right = [sum(digits_right(" 48213.", k) for k in cell["keys"]) for cell in results["cells"]]
    assert [cell["digits_right"] for cell in results["cells"]] == right
    assert results["digit_accuracy"] == pytest.approx(sum(right) / (2 * 4 * 5))


def test_passkey_mix_puts_the_needle_at_its_depth_and_the_answer_last():
    B, L = 300, 150
    x, y = get_batch(FILLER, B, L, torch.Generator().manual_seed(1))
    windows = torch.cat([x, y[:, -1:]], dim=1)  # [B, L + 1]
    mixed, needle_start, answer_mask = passkey_windows(windows, 0.3, torch.Generator().manual_seed(2))
    assert torch.equal(answer_mask[rows := needle_start >= 0, -len(ANSWER.format(key='12345')):].all(1),
                       torch.ones(int(rows.sum()), dtype=torch.bool)) and answer_mask.sum() == 7 * rows.sum()
    rows = needle_start >= 0
    assert 0.2 < rows.float().mean() < 0.4
    assert torch.equal(mixed[~rows], windows[~rows])  # plain rows untouched
    depths = []
    for b in rows.nonzero()[:, 0].tolist():
        text, at = decode(mixed[b]), needle_start[b].item()
        key = text[-1 - 5:-1]
        answer, needle = ANSWER.format(key=key), NEEDLE.format(key=key)
        assert key.isdigit() and text.endswith(QUESTION + answer) and text[at:].startswith(needle)
        filler = text[:at] + text[at + len(needle):-len(QUESTION + answer)]
        assert filler == decode(windows[b][:len(filler)])  # the window's own bytes, in order
        assert len(filler) == L + 1 - passkey_min_length()
        depths.append(at / len(filler))
    assert min(depths) < 0.1 and max(depths) > 0.9  # random depths over the whole window


def test_passkey_mix_trains_the_answer_digits_dense_and_packed():
    starts = torch.arange(0, len(FILLER), 500)  # documents of 500 bytes
    x, y = get_batch(FILLER, 64, 120, torch.Generator().manual_seed(3), passkey_fraction=0.5)
    xp, yp, cu = get_packed_batch(FILLER, starts, 64, 120, torch.Generator().manual_seed(3), passkey_fraction=0.5)
    assert torch.equal(xp, x.reshape(1, -1))  # the same windows and mix from the same draws
    plain_x, _ = get_batch(FILLER, 64, 120, torch.Generator().manual_seed(3))
    n_mixed = 0
    for b in range(64):
        text = decode(torch.cat([x[b], y[b, -1:]]))
        if QUESTION not in text:
            assert torch.equal(x[b], plain_x[b])  # the windows are drawn first: the mix changes only its rows
            continue
        n_mixed += 1
        key = text[text.index(NEEDLE[:16]) + 16:][:5]
        answer = ANSWER.format(key=key).encode()
        assert bytes(y[b, -len(answer):].tolist()) == answer  # the digits are the targets of the last positions
        assert bytes(x[b, :1 - len(answer)].tolist()).endswith(QUESTION.encode())  # the prompt answers from there
        inside = (cu > b * 120) & (cu < (b + 1) * 120)
        assert not inside.any() and not (yp[0, b * 120:(b + 1) * 120] == -100).any()  # one sequence, all targets
    assert 16 < n_mixed < 48
    with pytest.raises(ValueError, match="passkey mix"):
        get_batch(FILLER, 2, passkey_min_length() - 2, passkey_fraction=0.5)


def test_several_needles_each_question_asks_for_the_latest_key():
    B, L, needles = 200, 400, 4
    windows = FILLER[torch.arange(B)[:, None] * 7 + torch.arange(L + 1)].long()
    mixed, needle_start, answer_mask = passkey_windows(windows, 0.5, torch.Generator().manual_seed(5), needles)
    rows = needle_start >= 0
    assert torch.equal(mixed[~rows], windows[~rows]) and not answer_mask[~rows].any()
    counts = []
    for b in rows.nonzero()[:, 0].tolist():
        text = decode(mixed[b])
        assert len(mixed[b]) == L + 1 and text.index(NEEDLE[:16]) == needle_start[b]
        segments = text.split(QUESTION)[:-1]  # each ends with the answer of the previous question
        counts.append(len(segments))
        answers = []
        for j, before in enumerate(segments):
            key = before[before.rindex(NEEDLE[:16]) + 16:][:5]  # the most recent needle before the question
            after = text.split(QUESTION)[j + 1]
            assert after.startswith(ANSWER.format(key=key)), (b, j)
            answers.append(ANSWER.format(key=key))
        assert text.endswith(answers[-1])  # the window's last bytes answer its last question
        marked = bytes(mixed[b][answer_mask[b]].tolist()).decode()
        assert marked == "".join(answers)  # the mask covers exactly the answers' bytes
    assert set(counts) == {1, 2, 3, 4}
    with pytest.raises(ValueError, match="too short for the passkey mix with 9 needle"):
        passkey_windows(windows, 0.5, None, 9)


def test_answer_weights_mark_the_answer_of_passkey_rows_dense_and_packed():
    starts = torch.arange(0, len(FILLER), 500)
    x, y, w = get_batch(FILLER, 64, 120, torch.Generator().manual_seed(3), passkey_fraction=0.5, answer_weight=10.0)
    assert torch.equal(torch.stack(get_batch(FILLER, 64, 120, torch.Generator().manual_seed(3),
                                             passkey_fraction=0.5)), torch.stack([x, y]))  # the same draws
    answer = len(ANSWER.format(key="12345"))
    for b in range(64):
        mixed = QUESTION.encode() in bytes(x[b].tolist())
        assert (w[b, :-answer] == 1).all()
        assert (w[b, -answer:] == (10.0 if mixed else 1.0)).all(), b
    xp, yp, cu, wp = get_packed_batch(FILLER, starts, 64, 120, torch.Generator().manual_seed(3), passkey_fraction=0.5,
                                      answer_weight=10.0)
    assert (wp[yp == -100] == 0).all() and (yp == -100).any()  # ignored targets weigh nothing
    assert torch.equal(wp[yp != -100], w.reshape(1, -1)[yp != -100])


def test_selection_stats_of_a_tiny_nsa_model():
    # slc_block 32, n = 3 at length 199 (+ the answer's space): blocks 0 .. 6, all three slots forced (0, 5, 6).
    # Depth 0 puts the key's digits (bytes 16-20) in block 0: always selected (chance 1); depth 0.5 in block 2: never
    # (chance 0).
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_embd=16, n_head=4, n_kv_head=2, backend="reference",
                      nsa=NSAConfig(cmp_block=8, cmp_stride=4, slc_block=32, num_selected=3, window=16))
    results = passkey_grid(LanguageModel(cfg), FILLER, [199], [0.0, 0.5], trials=3)
    first, middle = (cell["nsa_layers"] for cell in results["cells"])
    assert len(first) == len(middle) == len(results["nsa_layers"]) == 2
    assert [s["chance"] for s in first + middle + results["nsa_layers"]] == [1.0, 1.0, 0.0, 0.0, 0.5, 0.5]
    for layer in first + middle + results["nsa_layers"]:
        assert all(0 < g < 1 for g in layer["gate_mean"].values())
    assert [s["hit_rate"] for s in first] == [1.0, 1.0] and [s["hit_rate"] for s in middle] == [0.0, 0.0]
    assert all(s["items"] == 3 * 2 * 5 for s in first)  # prompts x KV groups x digits
    assert [s["hit_rate"] for s in results["nsa_layers"]] == [0.5, 0.5]
    # compressed tokens start every 4 bytes and span 8: the key's digits (bytes 16-20 at depth 0) lie in the tokens
    # starting at 12, 16 and 20, of the 49 that the first digit's position sees: 199, after the prompt's 199 bytes
    # and the answer's space (i * 4 + 7 <= 199; the prompt's last byte, 198, sees 48)
    assert all(s["key_attention_uniform"] == pytest.approx(3 / 49) for s in first)
    for layer in first + middle + results["nsa_layers"]:
        assert len(layer["key_attention"]) == 4 and all(0 <= w <= 1 for w in layer["key_attention"])
        # an even spread over the 49 tokens has the largest entropy, log 49
        assert layer["cmp_entropy_uniform"] == pytest.approx(math.log(49))
        assert len(layer["cmp_entropy"]) == 4 and all(0 <= e <= math.log(49) + 1e-6 for e in layer["cmp_entropy"])
    for a, b, pooled in zip(first, middle, results["nsa_layers"]):
        assert pooled["key_attention"] == pytest.approx([(x + y) / 2 for x, y in zip(a["key_attention"],
                                                                                     b["key_attention"])])
    # free slots (n = 6 of 7 blocks): rates between 0 and 1, pooled over the cells by their counts
    wide = replace(cfg, nsa=replace(cfg.nsa, num_selected=6))
    results = passkey_grid(LanguageModel(wide), FILLER, [200, 300], [0.3, 0.6], trials=2)
    for layer, pooled in zip(zip(*(c["nsa_layers"] for c in results["cells"])), results["nsa_layers"]):
        assert all(0 <= s["hit_rate"] <= 1 for s in layer)
        assert pooled["hits"] == sum(s["hits"] for s in layer)
        assert pooled["chance"] == pytest.approx(sum(s["chance"] * s["items"] for s in layer) / pooled["items"])
        # no digit in a forced block: 3 free slots over the 4 (length 200) or 7 (length 300) other candidates
        assert [s["chance"] for s in layer] == pytest.approx([3 / 4, 3 / 4, 3 / 7, 3 / 7])
    # window only: the other gates are exactly 0
    swa = passkey_grid(LanguageModel(replace(cfg, branches=("swa",))), FILLER, [200], [0.5], trials=1)
    assert all(s["gate_mean"]["cmp"] == s["gate_mean"]["slc"] == 0 < s["gate_mean"]["swa"]
               for s in swa["nsa_layers"])
    full = passkey_grid(LanguageModel(replace(cfg, attention="full")), FILLER, [200], [0.5], trials=1)
    assert "nsa_layers" not in full and "nsa_layers" not in full["cells"][0]


def test_passkey_eval_runs_end_to_end(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=1, n_embd=16, n_head=2, n_kv_head=1, backend="reference",
                      nsa=NSAConfig(cmp_block=8, cmp_stride=4, slc_block=8, num_selected=2, window=16))
    model = LanguageModel(cfg)
    data = tmp_path / "text.txt"
    data.write_text(bytes(FILLER.tolist()).decode())
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoint.safetensors", model, step=0,
                    config=config_dict(cfg, TrainConfig(data=str(data))))
    loaded, _ = load_model(run)
    assert torch.equal(loaded.embed.weight, model.embed.weight)
    assert main(["eval", "passkey", str(run), "--lengths", "80,100", "--depths", "0,1", "--trials", "2",
                 "--device", "cpu"]) == 0
    results = json.loads((run / "passkey" / "passkey.json").read_text())
    assert results["lengths"] == [80, 100] and results["depths"] == [0, 1] and results["trials"] == 2
    assert len(results["accuracy"]) == 2 and all(0 <= a <= 1 for row in results["accuracy"] for a in row)
    assert len(results["cells"]) == 4 and all(len(c["answers"]) == 2 for c in results["cells"])
    assert (run / "passkey" / "passkey.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "heatmap" in printed and "layer 0: hit rate" in printed and "gates cmp" in printed
    assert len(results["nsa_layers"]) == 1 and 0 <= results["nsa_layers"][0]["hit_rate"] <= 1
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        main(["eval", "passkey", str(tmp_path / "nothing"), "--device", "cpu"])
    assert main(["eval", "repeat", str(run), "--lengths", "40,64", "--trials", "3", "--device", "cpu"]) == 0
    repeat = json.loads((run / "repeat" / "repeat.json").read_text())
    assert repeat["lengths"] == [40, 64] and repeat["trials"] == 3
    assert all(math.isfinite(x) for x in repeat["first"] + repeat["second"])
    assert "loss 2nd copy" in capsys.readouterr().out


class CopierAtHalf(torch.nn.Module):
    """Predicts, at position t of a [B, T] input, the byte T // 2 - 1 positions back (uniform when there is none):
    a perfect copier of a chunk written twice, blind to everything else."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, idx):
        B, T = idx.shape
        n = T // 2
        logits = torch.zeros(B, T, 256)
        t = torch.arange(n - 1, T)
        logits[:, t] = 30.0 * torch.nn.functional.one_hot(idx[:, t + 1 - n], 256).float()
        return logits, None


def test_repeat_loss_compares_the_same_bytes_of_both_copies():
    results = repeat_loss(CopierAtHalf(), FILLER, [64, 100], trials=3)
    assert results["lengths"] == [64, 100] and results["trials"] == 3
    for first, second in zip(results["first"], results["second"]):
        assert first == pytest.approx(math.log(256), rel=1e-5)  # nothing to copy from in the first copy
        assert second < 1e-6  # every byte of the second copy predicted from n bytes back
    with pytest.raises(ValueError, match="length 2 must be >= 4"):
        repeat_loss(CopierAtHalf(), FILLER, [2])


def test_copy_source_hits_finds_the_block_to_copy_from():
    """A tiny NSA model on a chunk written twice: the hit rate counts second-copy queries whose selection holds the
    source token; chance is block_chance's mean over those queries. Forcing every layer to select the source block gives 1.0."""
    torch.manual_seed(0)
    config = NSAConfig(cmp_block=8, cmp_stride=4, slc_block=8, num_selected=3, window=8)
    model = LanguageModel(ModelConfig(n_layer=2, n_embd=32, n_head=2, n_kv_head=1, nsa=config, backend="reference"))
    n = 40
    chunk = torch.randint(0, 256, (1, n))
    idx = torch.cat([chunk, chunk], 1)
    stats = copy_source_hits(model, idx)
    assert len(stats) == 2 and all(0.0 <= s["hit_rate"] <= 1.0 for s in stats)
    expected_chance = sum(block_chance((q - n + 1) // 8, q, config) for q in range(n, 2 * n)) / n
    assert all(s["chance"] == pytest.approx(expected_chance) for s in stats)

    def source_block_ids(q, k_cmp, cfg, **kwargs):  # every query selects exactly its source block
        t = torch.arange(q.shape[1])
        ids = torch.full((q.shape[0], q.shape[1], k_cmp.shape[2], cfg.num_selected), -1, dtype=torch.long)
        ids[..., 0] = ((t - n + 1).clamp_min(0) // cfg.slc_block)[None, :, None]
        return ids
    with mock.patch("nsa.eval.select_blocks", source_block_ids):
        assert [s["hit_rate"] for s in copy_source_hits(model, idx)] == [1.0, 1.0]

    # explicit sources (any layout): 10 queries copy from block 0, 10 from block 2, the rest copy nothing
    sources = torch.full((1, 2 * n), -1)
    sources[0, n:n + 10], sources[0, n + 10:n + 20] = 3, 20
    def block_zero_ids(q, k_cmp, cfg, **kwargs):
        return torch.zeros(q.shape[0], q.shape[1], k_cmp.shape[2], cfg.num_selected, dtype=torch.long)
    with mock.patch("nsa.eval.select_blocks", block_zero_ids):
        stats = copy_source_hits(model, idx, sources=sources)
    chance = (sum(block_chance(0, q, config) for q in range(n, n + 10)) +
              sum(block_chance(2, q, config) for q in range(n + 10, n + 20))) / 20
    assert [s["hit_rate"] for s in stats] == [0.5, 0.5] and stats[0]["chance"] == pytest.approx(chance)
    with pytest.raises(ValueError, match="sources must have idx's shape"):
        copy_source_hits(model, idx, sources=sources[:, 1:])
    assert repeat_loss(model, FILLER, [64], trials=2)["nsa_layers"][0][0].keys() >= {"hit_rate", "chance"}


def test_block_chance_counts_the_forced_blocks():
    config = NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=6, window=16)
    assert block_chance(3, 40, config) == 1.0  # J = 2: 3 candidates, all selected
    t = 16 * 20 + 5  # J = 20: forced 20, 19, 0; 3 free slots over the 18 other candidates
    assert [block_chance(b, t, config) for b in (20, 19, 0)] == [1.0, 1.0, 1.0]
    assert block_chance(7, t, config) == pytest.approx(3 / 18)
    two = NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=2, window=16)
    assert block_chance(0, t, two) == pytest.approx(0.0)  # n = 2: J and J - 1 take both slots
    # summed over every candidate, the chances are the n slots
    assert sum(block_chance(b, t, config) for b in range(21)) == pytest.approx(6)
    assert block_chance(5, 8191, NSAConfig()) == pytest.approx(13 / 125)  # the paper's 13 free of 125 at 8k
