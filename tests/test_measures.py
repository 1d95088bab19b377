"""Block influence, angular distance, spectral scores and the bounded row sample."""

import numpy as np
import pytest
import torch

from critlayer.capture import Batch
from critlayer.measures import BlockSimilarity, RowSample, spectral_scores


def _batch(states, seed=0):
    keys = torch.rand(states.shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return Batch(states, keys)


def test_block_that_keeps_its_input_has_zero_influence_and_a_flip_has_full():
    x = torch.randn(10, 8)
    states = torch.stack([x, x, -x])  # block 0 is the identity, block 1 negates
    sim = BlockSimilarity()
    sim.update(_batch(states))
    out = sim.compute()
    np.testing.assert_allclose(out["block_influence"], [0.0, 2.0], atol=1e-6)
    np.testing.assert_allclose(out["angular_distance"], [0.0, 1.0], atol=1e-3)


def test_orthogonal_output_has_half_angular_distance():
    x = torch.zeros(4, 2)
    x[:, 0] = 1
    y = torch.zeros(4, 2)
    y[:, 1] = 1
    sim = BlockSimilarity()
    sim.update(_batch(torch.stack([x, y])))
    assert sim.compute()["angular_distance"][0] == pytest.approx(0.5)


def test_spectral_scores_are_one_for_identical_layers_and_lower_for_unrelated_ones():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=g) * torch.linspace(5, 0.1, 16)
    same = spectral_scores(torch.stack([x, x, x]))
    for values in same.values():
        np.testing.assert_allclose(values, 1.0, atol=1e-6)
    other = spectral_scores(torch.stack([x, torch.randn(200, 16, generator=g), x]))
    assert other["spectral_k3"][1] < 0.5


def test_row_sample_is_bounded_and_independent_of_batching():
    g = torch.Generator().manual_seed(0)
    states, keys = torch.randn(3, 100, 4, generator=g), torch.rand(100, generator=g, dtype=torch.float64)
    whole = RowSample(max_rows=30)
    whole.update(Batch(states, keys))
    split = RowSample(max_rows=30)
    for part in torch.randperm(100, generator=g).split(7):
        split.update(Batch(states[:, part], keys[part]))
        assert split.keys.numel() <= 30
    assert torch.equal(whole.compute(), split.compute())
    assert torch.equal(whole.compute(), states[:, keys.argsort()[:30]])


def test_row_sample_keeps_every_row_under_its_bound():
    sample = RowSample(max_rows=50)
    sample.update(_batch(torch.randn(2, 20, 3)))
    assert sample.compute().shape == (2, 20, 3)
