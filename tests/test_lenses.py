"""The lenses beyond CKA, each on its defining property: ablation, gradient, weight spectra, token clusters."""

import numpy as np
import pytest
import torch

import critlayer
from critlayer import CritlayerError, LanguageModel
from critlayer.find.measures.ablation import SkipLosses
from critlayer.find.measures.clusters import TokenClusters, kmeans, nmi
from critlayer.find.measures.gradient import gradient_scores
from critlayer.find.measures.weights import matrix_snr, mp_median, weight_snr
from critlayer.models.loss import batch_losses, text_batches
from critlayer.models.surgery import sublayer

from conftest import tiny_model, tiny_tokenizer

TEXTS = [[1] + [(7 * i + 3 * j) % 60 + 4 for j in range(6 + i % 5)] for i in range(10)]


def _lm(arch="llama", layers=4):
    return LanguageModel.wrap(tiny_model(arch, layers), tiny_tokenizer(), name=f"tiny-{arch}")


def _silence(module, names):
    with torch.no_grad():
        for name, m in module.named_modules():
            if name.endswith(names):
                m.weight.zero_()


def test_skipping_a_block_that_passes_its_input_through_costs_nothing():
    lm = _lm()
    _silence(lm.blocks[2], ("o_proj", "down_proj"))  # block 2's output now equals its input
    scores = SkipLosses(lm, TEXTS, ("block", "attn", "mlp"), progress=False).compute()
    for name in ("ablation", "ablation_attn", "ablation_mlp"):
        assert abs(scores[name][2]) < 1e-6
        assert np.abs(np.delete(scores[name], 2)).max() > 1e-5


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # decoder layers returning a tensor, and a tuple
def test_replayed_ablation_equals_skipping_in_a_full_forward(arch):
    lm = _lm(arch)
    fast = SkipLosses(lm, TEXTS, ("block",), batch_size=3, progress=False).compute()["ablation"]

    def loss():
        total = tokens = 0.0
        with torch.no_grad():
            for _, batch in text_batches(TEXTS, 4, lm.device):
                s, n = batch_losses(lm.model, batch)
                total, tokens = total + float(s.sum()), tokens + float(n.sum())
        return total / tokens

    base = loss()
    for index, block in enumerate(lm.blocks):
        def identity(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        handle = block.register_forward_hook(identity, with_kwargs=True)
        assert fast[index] == pytest.approx(loss() - base, abs=1e-5)
        handle.remove()


def test_ablation_resample_stays_near_the_estimate_and_sublayers_are_found_or_refused():
    lm = _lm()
    ablation = SkipLosses(lm, TEXTS, ("block",), progress=False)
    weights = np.bincount(np.random.default_rng(0).integers(0, len(TEXTS), len(TEXTS)), minlength=len(TEXTS))
    replicate = ablation.compute(weights.astype(float))["ablation"]
    assert replicate.shape == (4,) and np.isfinite(replicate).all()
    assert sublayer(lm.blocks[0], "attn") is lm.blocks[0].self_attn
    with pytest.raises(CritlayerError, match="cannot find one mlp sublayer"):
        sublayer(torch.nn.Sequential(torch.nn.Linear(2, 2)), "mlp")


def test_gradient_vanishes_when_no_path_reaches_the_loss_and_ignores_batch_size():
    lm = _lm()
    one, many = gradient_scores(lm, TEXTS, batch_size=1), gradient_scores(lm, TEXTS, batch_size=8)
    np.testing.assert_allclose(one, many, rtol=1e-4)
    assert (one > 0).all()
    assert all(p.grad is None for p in lm.model.parameters())  # leaves the model as it found it
    with torch.no_grad():
        lm.model.model.norm.weight.zero_()  # the final norm cuts every block off from the logits
    np.testing.assert_allclose(gradient_scores(lm, TEXTS), 0.0, atol=1e-12)


def test_marchenko_pastur_median_matches_random_matrices():
    g = torch.Generator().manual_seed(0)
    for m, n in ((1000, 1000), (1200, 300)):
        eig = torch.linalg.svdvals(torch.randn(m, n, generator=g, dtype=torch.float64)) ** 2 / m
        assert mp_median(n / m) == pytest.approx(float(eig.median()), rel=0.01)


def test_noise_has_snr_near_zero_and_a_low_rank_signal_a_high_one():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(384, 128, generator=g) * 0.02
    assert matrix_snr(noise) < 0.05
    assert matrix_snr(noise * 100) == pytest.approx(matrix_snr(noise), abs=1e-9)  # scale-free
    signal = torch.randn(384, 3, generator=g) @ torch.randn(3, 128, generator=g) * 0.02
    assert matrix_snr(signal + noise) > 1.0


def test_weight_snr_reads_safetensors_block_by_block_and_matches_the_loaded_weights(tiny_folder):
    streamed = critlayer.load(str(tiny_folder), stream=True)
    scores, source = weight_snr(streamed)
    assert source.startswith("safetensors") and all(p.is_meta for p in streamed.blocks.parameters())
    in_memory, memory_source = weight_snr(critlayer.load(str(tiny_folder)))
    assert memory_source == "loaded parameters"
    np.testing.assert_allclose(scores, in_memory, rtol=1e-6)


def test_nmi_is_one_for_identical_clusterings_and_near_zero_for_independent_ones():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 8, 20000)
    assert nmi(a, a) == pytest.approx(1.0)
    assert nmi(a, (a + 3) % 8) == pytest.approx(1.0)  # renamed clusters
    assert nmi(a, rng.integers(0, 8, 20000)) < 0.01
    assert nmi(np.zeros(5), np.zeros(5)) == 1.0


def test_kmeans_recovers_separated_clusters_and_drift_scores_have_their_shape():
    g = torch.Generator().manual_seed(0)
    truth = torch.arange(300) % 3
    x = torch.eye(8)[truth] * 10 + torch.randn(300, 8, generator=g)
    assert nmi(kmeans(x, 3).numpy(), truth.numpy()) == pytest.approx(1.0)
    states = torch.stack([x, x, torch.randn(300, 8, generator=g)])  # block 0 keeps the groups, block 1 scrambles
    scores = TokenClusters(states, k=3).scores()
    assert scores["token_nmi"][0] == pytest.approx(1.0) and scores["token_nmi"][1] < 0.1
    assert scores["token_nmi_drop"][1] > 0.9 and abs(scores["token_nmi_drop"][0]) < 1e-9
