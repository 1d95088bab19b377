"""The consensus ranking, its bootstrap P(critical), and the scan that runs every measure."""

import numpy as np
import pytest

from critlayer import CritlayerError, LanguageModel, ScanResult, scan
from critlayer.find.consensus import agreement, bootstrap_critical, consensus, criticality_rank
from critlayer.find.measures import DIRECTION, MEASURES
from critlayer.find.measures.rows import resample_rows
from critlayer.find.probes import Probes, random_probes

from conftest import tiny_model, tiny_tokenizer


def test_consensus_of_identical_rankings_is_that_ranking_whatever_the_direction():
    crit = np.array([0.1, 0.9, 0.5, 0.3, 0.7])  # high = critical
    scores = {"block_influence": crit, "delta": -crit * 3 + 1, "ablation": crit ** 2, "weight_snr": crit + 5}
    groups = {"influence": ["block_influence"], "cka": ["delta"], "ablation": ["ablation"], "weights": ["weight_snr"]}
    np.testing.assert_allclose(consensus(scores, groups), criticality_rank(crit, 1))
    assert list(np.argsort(-consensus(scores, groups))) == [1, 4, 2, 3, 0]
    np.testing.assert_allclose(agreement(scores, list(scores)), 1.0)


def test_every_measure_weighs_the_same_however_many_scores_it_reports():
    up, down = np.arange(4.0), -np.arange(4.0)
    scores = {"spectral_k1": up, "spectral_k3": up, "spectral_k10": up, "gradient": up}  # spectral: low = critical
    together = consensus(scores, {"spectral": ["spectral_k1", "spectral_k3", "spectral_k10"], "gradient": ["gradient"]})
    np.testing.assert_allclose(together, 0.5)  # one measure against the other, whatever the count of scores
    assert DIRECTION["spectral_k1"] == -1 and criticality_rank(down, 1)[0] == 1.0


def test_bootstrap_probabilities_lie_in_unit_interval_and_sum_to_the_mean_number_selected():
    base = np.linspace(0, 1, 8)
    sizes = []

    def replicate(rng):
        return {"gradient": base + rng.normal(0, 0.3, 8)}

    def select(scores):
        chosen = list(np.argsort(-scores["consensus"])[: 1 + len(sizes) % 3])
        sizes.append(len(chosen))
        return chosen

    p = bootstrap_critical(replicate, {"gradient": ["gradient"]}, select, 8, replicates=60, seed=0)
    assert ((p >= 0) & (p <= 1)).all() and p.sum() == pytest.approx(np.mean(sizes))
    assert p[-1] > p[0]


def test_resampled_rows_are_half_the_probes_with_every_row_of_each():
    row_samples = np.array([0, 0, 0, 1, 2, 2, 3, 3])
    for seed in range(5):
        rows = resample_rows(row_samples, np.random.default_rng(seed))
        assert len(set(rows.tolist())) == len(rows)  # without replacement
        counts = np.bincount(row_samples[rows], minlength=4)
        drawn = np.flatnonzero(counts)
        assert len(drawn) == 2 and (counts[drawn] == np.bincount(row_samples)[drawn]).all()


def _lm():
    return LanguageModel.wrap(tiny_model("llama", 6), tiny_tokenizer(), name="tiny-llama")


def test_scan_with_every_measure_gives_a_consensus_and_probabilities(tmp_path):
    lm = _lm()
    probes = Probes("tokens", random_probes(lm, 16, 12, 0))
    result = scan(lm, probes=probes, measures="all", k=2, bootstrap=20, score="consensus", progress=False)
    expected = {s for m in MEASURES.values() for s in {**m.scores, **m.extra}} - {"ablation_attn", "ablation_mlp"}
    assert expected | {"consensus", "p_critical"} == set(result.scores)
    assert result.selection.score == "consensus" and len(result.critical) == 2
    assert result.scores["p_critical"].sum() == pytest.approx(2.0)  # top-2 in every replicate
    assert result.consensus.held_fixed == ["gradient", "weights"]
    assert set(result.timing["measures"]) == set(MEASURES)
    assert np.shape(result.consensus.agreement) == (len(result.consensus.scores),) * 2
    result.save(tmp_path / "out")
    assert (tmp_path / "out" / "measures.png").stat().st_size > 0
    again = ScanResult.load(tmp_path / "out")
    assert again.consensus.groups == result.consensus.groups and again.ranking("consensus")[0] in result.critical


def test_weights_alone_need_no_probes_and_loss_measures_refuse_random_tokens():
    lm = _lm()
    result = scan(lm, measures="weights", progress=False)
    assert result.probes == {} and result.capture == {} and result.consensus.bootstrap == 0
    with pytest.raises(CritlayerError, match="random probes have none"):
        scan(lm, probes="random", measures="cka,gradient", progress=False)
    with pytest.raises(CritlayerError, match="--data is only read by"):
        scan(lm, measures="cka", data="bbc", progress=False)
    with pytest.raises(CritlayerError, match="unknown part"):
        scan(lm, measures="ablation", ablate="ffn", progress=False)
