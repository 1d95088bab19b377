"""The selection rule: valleys, top-k, edges."""

import numpy as np
import pytest

from critlayer import CritlayerError
from critlayer.find.select import find_valleys, select_critical


def test_band_is_the_most_prominent_valley():
    delta = np.array([0.5, 0.6, 0.97, 0.98, 0.97, 0.80, 0.78, 0.85, 0.98, 0.97, 0.96, 0.95, 0.97, 0.6, 0.5])
    sel = select_critical(delta, window=2)
    assert sel.rule == "band"
    assert sel.critical == [5, 6, 7]  # below half the prominence of the dip at 6
    assert all(2 <= i <= 12 for i in sel.critical)


def test_a_valley_under_half_the_deepest_prominence_is_not_kept():
    """smollm2-135m's second valley is 0.23-0.36 times as deep as its first; one at 0.6 times is kept."""
    delta = np.array([0.9, 0.9, 0.97, 0.96, 0.95, 0.96, 0.97, 0.98, 0.98, 0.9, 0.98, 0.98, 0.9, 0.9])
    sel = select_critical(delta, window=2)  # prominences 0.02 (block 4) and 0.08 (block 9)
    assert sel.critical == [9] and [v.block for v in sel.valleys] == [4, 9]
    assert sel.to_json()["params"]["min_relative_prominence"] == 0.5
    deeper = delta.copy()
    deeper[4] = 0.92  # prominence 0.05: kept beside block 9
    assert select_critical(deeper, window=2).critical == [4, 9]


def test_edges_are_eligible_only_on_request():
    delta = np.array([0.1, 0.2, 0.9, 0.95, 0.9, 0.5, 0.9, 0.95, 0.9, 0.2, 0.1])
    assert select_critical(delta, window=2).critical == [5]
    assert select_critical(delta, k=2, window=2).critical == [2, 5]  # ties go to the lower index
    assert select_critical(delta, k=2, window=2, edges=True).critical == [0, 10]


def test_a_monotone_profile_singles_out_no_band():
    sel = select_critical(np.linspace(0.9, 0.5, 10), window=1)
    assert sel.critical == [] and "no valley" in sel.reason


def test_high_is_critical_direction():
    influence = np.array([0.0, 0.1, 0.1, 0.9, 0.1, 0.1, 0.0])
    assert select_critical(influence, direction=1, score_name="block_influence", window=1).critical == [3]


def test_k_out_of_range_is_an_error():
    with pytest.raises(CritlayerError, match="outside 1..5"):
        select_critical(np.ones(5), k=6)


def test_valley_prominence():
    valleys = find_valleys(np.array([1.0, 0.0, 0.5, 0.2, 1.0]))
    assert [(v["index"], v["prominence"]) for v in valleys] == [(1, 1.0), (3, 0.3)]


def test_a_flat_stretch_at_the_end_is_no_valley():
    assert find_valleys(np.array([1.0, 0.0, 0.0])) == []
