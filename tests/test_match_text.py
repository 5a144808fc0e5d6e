"""tiny_models/match_grid/text.py: byte-level language models on the plays, the loss by position."""

import argparse
import json

import numpy as np
import pytest
import torch

from tiny_models.match_grid import text as tx

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ARGV = ["--seq_len", "32", "--window", "8", "--top_k", "1", "--block_size", "4", "--n_layer", "1"]
ARGV += ["--n_embd", "16", "--steps", "3", "--batch_size", "2", "--text_chars", "20000", "--n_eval", "4"]
ARGV += ["--no_progress"]


def test_three_models_four_curves_and_resume(tmp_path, monkeypatch):
    out, res = tmp_path / "runs", tmp_path / "res"
    argv = [*ARGV, "--out", str(out)]
    curves = tx.main([*argv, "--results", str(res)])
    assert list(curves) == list(tx.VARIANTS) and all(np.asarray(c).shape == (32,) for c in curves.values())
    runs = json.loads((res / "runs.json").read_text())
    assert runs["match"]["config"]["attention"] == "match" and runs["swa"]["config"]["window"] == 8
    assert (res / "loss_by_position.png").stat().st_size > 0 and "overall" in (res / "results.md").read_text()
    # the inference variant is the swa weights under MATCH: its curve equals a fresh swap of the saved model
    swa = tx.load_model(str(out / "swa" / "model.safetensors"))[0]
    m = tx.swapped(swa, attention="match", attn_kwargs=(("top_k", 1), ("block_size", 4), ("mode", "joint")))
    a = argparse.Namespace(seq_len=32, text_chars=20000, n_eval=4)
    np.testing.assert_allclose(tx.loss_by_position(m, tx.heldout_windows(a)), curves["swa_match_inference"])

    def boom(cfg):
        raise AssertionError("a finished model was trained again")

    monkeypatch.setattr(tx, "train", boom)
    again = tx.main(argv)
    np.testing.assert_allclose(again["full"], curves["full"])


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
