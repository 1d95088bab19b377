"""Block influence, angular distance, spectral scores and the bounded row sample."""

import os

import numpy as np
import pytest
import torch

from critlayer.find.capture import Batch, Capture
from critlayer import CritlayerError
from critlayer.find.measures import BlockSimilarity, RowSample, cka_matrix, similarity_scores, spectral_scores
from critlayer.find.measures.similarity import block_cosines
from critlayer.find.measures.spectral import top_eigenvectors
from critlayer.find.probes import Probes, random_probes


def _batch(states, seed=0):
    keys = torch.rand(states.shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return Batch(states, keys, cosines=block_cosines(states))


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


def test_lanczos_finds_the_top_eigenvectors_without_a_full_decomposition(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 400, generator=g, dtype=torch.float64) * torch.logspace(1, -2, 400, dtype=torch.float64)
    c = x.T @ x
    expected = torch.linalg.eigh(c).eigenvectors[:, -10:].flip(-1)
    sizes, eigh = [], torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda m: sizes.append(len(m)) or eigh(m))
    found = top_eigenvectors(c, 10)
    assert sizes and max(sizes) < 400  # only the small Rayleigh-Ritz problems
    np.testing.assert_allclose((found * expected).sum(0).abs(), 1.0, atol=1e-9)  # the same vectors, up to sign


def _sampled(lm, probes, batch_size, max_rows):
    capture = Capture(lm, probes, token_mode="all", batch_size=batch_size, max_rows=max_rows, progress=False)
    for _ in capture:
        pass
    return capture.sample, capture


def _by_key(sample):
    """The sample's rows, keys and probes in key order (slots hold them in whatever order they entered)."""
    order = sample.row_keys().argsort()
    return sample.compute()[:, order], sample.row_keys()[order], sample.row_samples()[order.numpy()]


def test_row_sample_is_the_smallest_keys_whatever_the_batching(tiny_lm):
    probes = Probes("random", random_probes(tiny_lm, 12, 10, 0))
    everything, _ = _sampled(tiny_lm, probes, 12, 1000)
    assert len(everything) == 12 * 9
    rows, keys, samples = _by_key(everything)
    for batch_size in (1, 5, 12):
        sample, capture = _sampled(tiny_lm, probes, batch_size, 30)
        assert len(sample) == 30 and capture.stats.rows == 12 * 9  # the cosines still cover every row
        kept_rows, kept_keys, kept_samples = _by_key(sample)
        assert torch.equal(kept_keys, keys[:30])
        torch.testing.assert_close(kept_rows, rows[:, :30], atol=1e-5, rtol=1e-5)
        np.testing.assert_array_equal(kept_samples, samples[:30])


def test_row_sample_keeps_the_smallest_keys_seen_overwriting_larger_ones():
    g = torch.Generator().manual_seed(0)
    states, keys = torch.randn(3, 10, 4, generator=g), torch.rand(10, generator=g, dtype=torch.float64)
    sample = RowSample(4)
    for part in torch.arange(10).split(3):
        sample.update(Batch(states[:, part], keys[part], part.numpy()))
        assert len(sample) == min(4, int(part[-1]) + 1)
    smallest = keys.argsort()[:4]
    assert set(sample.row_samples().tolist()) == set(smallest.tolist())
    for slot, probe in enumerate(sample.row_samples()):  # each slot holds its own row's states and key
        assert torch.equal(sample.compute()[:, torch.tensor([slot])][:, 0], states[:, probe])
        assert sample.row_keys()[slot] == keys[probe]
    assert sample.threshold() == keys[smallest[-1]]


def test_the_file_backed_sample_reads_like_the_tensor_it_holds():
    g = torch.Generator().manual_seed(1)
    states, keys = torch.randn(4, 40, 6, generator=g) + 3.0, torch.rand(40, generator=g, dtype=torch.float64).sort().values
    sample = RowSample(40)
    for part in torch.arange(40).split(7):  # rows arrive over several batches
        sample.update(Batch(states[:, part], keys[part], part.numpy()))
    stored, expected = sample.compute(), states
    assert stored.shape == expected.shape and len(stored) == 4
    assert torch.equal(stored[2], expected[2]) and torch.equal(stored[1:][0], expected[1])
    assert torch.equal(stored[-1], expected[-1])
    assert torch.equal(stored[1:3][:, 5:9], expected[1:3, 5:9])
    rows = torch.randperm(40, generator=g)[:20]  # a replicate: half the rows, unsorted
    assert torch.equal(stored[:, rows], expected[:, rows])
    np.testing.assert_allclose(cka_matrix(stored, rows, budget=100), cka_matrix(expected, rows), atol=1e-6)
    for on_file, in_memory in ((spectral_scores(stored, rows=rows), spectral_scores(expected, rows=rows)),
                               (similarity_scores(stored, rows), similarity_scores(expected, rows))):
        for name in in_memory:
            np.testing.assert_allclose(on_file[name], in_memory[name], atol=1e-6)


def test_a_bfloat16_sample_is_stored_as_it_came_in_half_the_space():
    g = torch.Generator().manual_seed(2)
    states = (torch.randn(3, 20, 8, generator=g) * 50).bfloat16()
    keys = torch.rand(20, generator=g, dtype=torch.float64).sort().values
    samples = {}
    for dtype in (torch.bfloat16, torch.float32):
        samples[dtype] = RowSample(20)
        samples[dtype].update(Batch(states.to(dtype), keys))
        assert torch.equal(samples[dtype].compute()[:, :], states.float())  # read back as float32, exactly
    sizes = {dtype: os.fstat(sample.file.fileno()).st_size for dtype, sample in samples.items()}
    assert sizes[torch.bfloat16] * 2 == sizes[torch.float32]


def test_a_full_disk_is_one_clear_error(monkeypatch):
    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("critlayer.find.measures.rows.os.pwrite", full)
    keys = torch.tensor([0.25, 0.5], dtype=torch.float64)
    with pytest.raises(CritlayerError, match="No space left on device; point TMPDIR at a larger disk"):
        RowSample(2).update(Batch(torch.ones(3, 2, 4), keys))
