"""tiny_models/match_grid/text.py: byte-level language models on the plays, the loss by position."""

import argparse
import json

import numpy as np
import pytest
import torch

from tiny_models.gpt import GPT, GPTConfig
from tiny_models.match_grid import text as tx

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ARGV = ["--seq_len", "32", "--window", "8", "--top_k", "1", "--block_size", "4", "--n_layer", "1"]
ARGV += ["--n_embd", "16", "--steps", "3", "--batch_size", "2", "--text_chars", "20000", "--n_eval", "4"]
ARGV += ["--no_progress"]


def test_three_models_four_curves_tables_and_resume(tmp_path, monkeypatch):
    out, res = tmp_path / "runs", tmp_path / "res"
    argv = [*ARGV, "--out", str(out)]
    got = tx.main([*argv, "--results", str(res)])
    curves = got["curves"]
    assert list(curves) == list(tx.VARIANTS) and all(np.asarray(c).shape == (32,) for c in curves.values())
    runs = json.loads((res / "runs.json").read_text())["seeds"]["0"]
    assert runs["records"]["match"]["config"]["attention"] == "match"
    assert runs["records"]["swa"]["config"]["window"] == 8
    assert (res / "loss_by_position.png").stat().st_size > 0
    md = (res / "results.md").read_text()
    assert "overall" in md and "positions ≥ 8" in md and "cut to a window of" in md
    # the inference variant is the swa weights under MATCH: its curve equals a fresh swap of the saved model
    swa = tx.load_model(str(out / "seed0" / "swa" / "model.safetensors"))[0]
    m = tx.swapped(swa, attention="match", attn_kwargs=(("top_k", 1), ("block_size", 4), ("mode", "joint")))
    a = argparse.Namespace(seq_len=32, text_chars=20000, n_eval=4)
    wins = tx.heldout_windows(a)
    # (records store the curve to 4 decimals)
    np.testing.assert_allclose(tx.loss_by_position(m, wins), curves["swa_match_inference"], rtol=0, atol=5e-5)
    # the per-window numbers the paired table reads are those of the model
    lo = tx.window_losses(m, wins)
    rec = runs["records"]["swa_match_inference"]
    np.testing.assert_allclose(rec["window_loss"], lo.mean(1), atol=1e-5)
    np.testing.assert_allclose(rec["window_loss_beyond"], lo[:, 8:].mean(1), atol=1e-5)
    # the probe's widths: powers of two below T and the window
    assert sorted(int(k) for k in runs["probe"]) == [4, 8, 16]

    def boom(cfg):
        raise AssertionError("a finished model was trained again")

    monkeypatch.setattr(tx, "train", boom)
    again = tx.main(argv)
    np.testing.assert_allclose(again["curves"]["full"], curves["full"])
    # the committed records stand in when the runs are gone: nothing is trained or loaded
    monkeypatch.setattr(tx, "trained_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    again = tx.main([*ARGV, "--out", str(tmp_path / "elsewhere"), "--results", str(res)])
    np.testing.assert_allclose(again["curves"]["match"], curves["match"], atol=1e-4)


def test_a_record_of_another_setting_does_not_stand_in(tmp_path):
    res = tmp_path / "res"
    tx.main([*ARGV, "--out", str(tmp_path / "runs"), "--results", str(res)])
    prior = tx.read_prior(str(res))
    a = argparse.Namespace(**{**vars(parse(ARGV)), "out": str(tmp_path / "other")})
    assert tx.usable(prior[("rec", 0, "match")], "match", a, 0)  # where it is written does not matter
    b = argparse.Namespace(**{**vars(a), "top_k": 2})
    assert tx.usable(prior[("rec", 0, "swa")], "swa", b, 0)  # swa does not read top_k
    assert not tx.usable(prior[("rec", 0, "match")], "match", b, 0)
    assert not tx.usable(prior[("rec", 0, "swa_match_inference")], "swa_match_inference", b, 0)
    assert not tx.usable(prior[("rec", 0, "full")], "full", a, 1)  # another seed
    c = argparse.Namespace(**{**vars(a), "n_eval": 5})
    assert not tx.usable(prior[("rec", 0, "full")], "full", c, 0)  # other held-out windows


def parse(argv):
    return tx.parser().parse_args(argv)


def test_context_use_probe_is_the_cut_models_extra_loss():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, block_size=24, n_layer=1, n_head=2, n_embd=16))
    wins = torch.randint(0, 256, (3, 25))
    got = tx.context_use(model, wins, [4, 23])
    base = tx.window_losses(model, wins)
    cut = tx.window_losses(tx.swapped(model, attention="sliding", window=4), wins)
    np.testing.assert_allclose(got[4], (cut[:, 4:] - base[:, 4:]).mean(1))
    # the cut changes nothing before position w' (a window of w' keys holds every earlier key there):
    # the probe averages only over the positions it cuts
    cut23 = tx.window_losses(tx.swapped(model, attention="sliding", window=23), wins)
    np.testing.assert_allclose(cut23[:, :23], base[:, :23], rtol=0, atol=1e-5)
    np.testing.assert_allclose(got[23], cut23[:, 23] - base[:, 23])
    with pytest.raises(ValueError, match="full-attention"):
        tx.context_use(tx.swapped(model, attention="sliding", window=4), wins, [4])


def test_paired_vs_swa_is_per_window_and_seed():
    def rec(overall, beyond):
        return {"window_loss": overall, "window_loss_beyond": beyond}

    results = {
        k: {
            "records": {
                "swa": rec([1.0, 2.0], [1.0, 1.0]),
                "full": rec([0.5 + k, 1.5], [0.0, 0.0]),
                "swa_match_inference": rec([1.0, 2.0], [2.0, 2.0]),
                "match": rec([1.0, 2.0], [1.0, 1.0]),
            }
        }
        for k in (0, 2)
    }
    p = tx.paired_vs_swa(results)
    # full - swa overall: seed 0 (-0.5, -0.5), seed 2 (+1.5, -0.5): mean over windows of the seed mean = 0
    assert p["full"]["overall"]["mean"] == pytest.approx(0.0) and p["full"]["overall"]["seeds"] == 2
    assert p["full"]["overall"]["sd"] == pytest.approx(np.std([-0.5, 0.5], ddof=1))
    assert p["full"]["beyond"]["mean"] == pytest.approx(-1.0) and p["full"]["beyond"]["sd"] == 0.0
    assert p["swa_match_inference"]["beyond"]["mean"] == pytest.approx(1.0)
    assert p["match"]["overall"] == {"mean": 0.0, "lo": 0.0, "hi": 0.0, "sd": 0.0, "seeds": 2}


def test_window_must_be_inside_the_context():
    with pytest.raises(ValueError, match="--window"):
        tx.main([*ARGV[:2], "--window", "32", *ARGV[4:]])


def test_loss_by_position_is_the_per_position_cross_entropy():
    # a model whose logits are fixed: the loss at every position is -log softmax(logits)[target]
    class Fixed(torch.nn.Module):
        def forward(self, x):
            return torch.log(torch.tensor([0.5, 0.25, 0.25]))[None, None].expand(x.shape[0], x.shape[1], 3)

    w = torch.tensor([[0, 1, 2, 0], [0, 0, 0, 0]])  # targets (1, 2, 0) and (0, 0, 0)
    got = tx.loss_by_position(Fixed(), w, batch=1)
    np.testing.assert_allclose(got, [(np.log(4) + np.log(2)) / 2, (np.log(4) + np.log(2)) / 2, np.log(2)])


def test_spans_double_beyond_the_window():
    assert tx.spans(1024, 128) == [(0, 128), (128, 256), (256, 512), (512, 1024)]
    assert tx.spans(100, 128) == [(0, 100)]
