"""Passkey evaluation: prompt layout, the scorer, and an end-to-end run on a tiny model through the CLI."""
import json

import pytest
import torch

pytest.importorskip("safetensors")

from nsa import LanguageModel, ModelConfig, NSAConfig
from nsa.checkpoint import load_model, save_checkpoint
from nsa.cli import main
from nsa.data import encode
from nsa.eval import NEEDLE, QUESTION, make_prompt, score_answer
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
    assert "heatmap" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        main(["eval", "passkey", str(tmp_path / "nothing"), "--device", "cpu"])
