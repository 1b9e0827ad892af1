"""flowkern.train.evaluate: fixed noise, drawing at several step counts, scores and the text table."""
from __future__ import annotations

import torch

from flowkern.data import get_dataset
from flowkern.metrics import histogram_kl, sliced_wasserstein2
from flowkern.train.evaluate import draw, fixed_noise, format_table, kl_range, score


def test_draw_uses_the_same_noise_for_every_step_count():
    dataset = get_dataset("8gaussians")
    model = torch.nn.Linear(2, 2)
    drawn = draw(lambda m, noise, k: noise * k, model, dataset, (1, 3), n=50, seed=4)
    noise = fixed_noise(dataset, 50, 4)
    assert torch.equal(drawn[1], noise) and torch.equal(drawn[3], 3 * noise)


def test_score_is_the_metrics_on_the_dataset_grid():
    dataset = get_dataset("checkerboard")
    reference = dataset.held_out(400)
    x = dataset.sample(400, torch.Generator().manual_seed(1))
    low, high, bins = kl_range(dataset)
    assert (low, high, bins) == (-4.5, 4.5, 32)
    scores = score({2: x}, dataset, reference)
    assert scores[2]["sw2"] == sliced_wasserstein2(x, reference)
    assert scores[2]["kl"] == histogram_kl(reference, x, low=low, high=high, bins=bins)
    assert score({1: reference}, dataset, reference)[1]["sw2"] == 0.0


def test_format_table_leaves_missing_cells_blank():
    text = format_table([("a", {1: {"sw2": 0.5, "kl": 1.25}}), ("b", {2: {"sw2": 0.125, "kl": 2.0}})], (1, 2))
    head, rule, a, b = text.splitlines()
    assert "SW2@1" in head and "KL@2" in head and set(rule) == {"-"}
    assert a.split() == ["a", "0.5000", "1.2500"] and b.split() == ["b", "0.1250", "2.0000"]
    assert len(a) == len(b) == len(head)
