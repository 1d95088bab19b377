"""Linear CKA (the unbiased HSIC estimator): the properties that define it, its bias, and exactness of the
streaming scan."""

import numpy as np
import pytest
import torch

from critlayer import scan
from critlayer.find.measures import cka_matrix, delta_scores, linear_cka
from critlayer.find.probes import Probes, random_probes


def _hsic_u(k: np.ndarray, l: np.ndarray) -> float:
    """Song et al. (2012), eq. 5, written out in numpy, float64."""
    n = len(k)
    k, l = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))
    one = np.ones(n)
    return (np.trace(k @ l) + one @ k @ one * (one @ l @ one) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * one @ k @ l @ one) / (n * (n - 3))


def _reference_cka(x: np.ndarray, y: np.ndarray) -> float:
    k, l = x @ x.T, y @ y.T  # uncentred: the estimator does not need centring
    return _hsic_u(k, l) / np.sqrt(_hsic_u(k, k) * _hsic_u(l, l))


@pytest.fixture
def xy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 20, generator=g, dtype=torch.float64)
    y = x @ torch.randn(20, 30, generator=g, dtype=torch.float64) + 0.5 * torch.randn(50, 30, generator=g, dtype=torch.float64)
    return x, y


def test_identical_inputs_give_one(xy):
    x, _ = xy
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert cka_matrix(torch.stack([x, x]))[0, 1] == pytest.approx(1.0, abs=1e-6)


def test_symmetric(xy):
    x, y = xy
    assert linear_cka(x, y) == pytest.approx(linear_cka(y, x), abs=1e-12)
    states = torch.randn(5, 40, 16)
    m = cka_matrix(states)
    np.testing.assert_allclose(m, m.T, atol=1e-12)


def test_invariant_to_orthogonal_transforms_and_isotropic_scaling(xy):
    x, y = xy
    q, _ = torch.linalg.qr(torch.randn(30, 30, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    base = linear_cka(x, y)
    assert linear_cka(x, y @ q) == pytest.approx(base, abs=1e-10)
    assert linear_cka(3.7 * x, y) == pytest.approx(base, abs=1e-10)
    assert linear_cka(x, 0.01 * y) == pytest.approx(base, abs=1e-10)
    assert linear_cka(x, y) < 0.999  # the test data are not trivially identical


def test_matrix_equals_direct_reference_on_random_data():
    g = torch.Generator().manual_seed(2)
    states = torch.randn(6, 64, 24, generator=g).cumsum(0)  # correlated layers, like a residual stream
    m = cka_matrix(states)
    for i in range(6):
        for j in range(6):
            ref = _reference_cka(states[i].double().numpy(), states[j].double().numpy())
            assert m[i, j] == pytest.approx(ref, abs=1e-6)


def test_matrix_is_the_same_whatever_the_slabs_and_indexes_rows_without_copying_them():
    g = torch.Generator().manual_seed(3)
    states = torch.randn(4, 50, 8, generator=g).cumsum(0) + 5.0  # far from centred, like hidden states
    whole = cka_matrix(states, budget=1 << 20)
    for budget in (32, 100, 4 * 8 * 7):  # one row per slab, uneven slabs, slabs of 7 rows
        np.testing.assert_allclose(cka_matrix(states, budget=budget), whole, atol=1e-6)
    rows = torch.randperm(50, generator=g)[:25]  # a replicate: half the rows, unsorted
    np.testing.assert_allclose(cka_matrix(states, rows, budget=100), cka_matrix(states[:, rows]), atol=1e-6)


def test_unrelated_features_read_as_unrelated_however_few_the_rows():
    """The plain estimator reads noise as shared structure when rows are fewer than features, less so with more
    rows; the unbiased one stays near 0 whatever the number of rows."""
    g = torch.Generator().manual_seed(4)
    for rows in (16, 64, 256):
        x, y = (torch.randn(rows, 128, generator=g, dtype=torch.float64) for _ in range(2))
        xc, yc = x - x.mean(0), y - y.mean(0)
        plain = float((yc.T @ xc).square().sum() / ((xc.T @ xc).norm() * (yc.T @ yc).norm()))
        assert plain > 0.3 if rows <= 64 else plain > 0.2
        assert abs(linear_cka(x, y)) < 0.1


def test_delta_is_window_mean_clipped_at_the_ends():
    m = np.arange(25, dtype=float).reshape(5, 5)
    d = delta_scores(m, window=2)
    assert d[0] == pytest.approx(m[0, 0:3].mean())
    assert d[2] == pytest.approx(m[2, 0:5].mean())
    assert d[4] == pytest.approx(m[4, 2:5].mean())
    assert delta_scores(m, window=1)[1] == pytest.approx(m[1, 0:3].mean())


@pytest.mark.parametrize("token_mode", ["last", "all", "mean"])
def test_scan_is_identical_whatever_the_batch_size(tiny_lm, token_mode):
    probes = Probes("random", [ids[: 5 + i % 9] for i, ids in enumerate(random_probes(tiny_lm, 23, 16, 0))])
    results = [scan(tiny_lm, probes=probes, token_mode=token_mode, batch_size=b, progress=False) for b in (1, 4, 23)]
    for other in results[1:]:
        np.testing.assert_allclose(other.cka, results[0].cka, atol=1e-6)
        for name, values in results[0].scores.items():
            np.testing.assert_allclose(other.scores[name], values, atol=1e-6)


@pytest.mark.parametrize("token_mode", ["last", "all"])
def test_massive_activation_filter_does_not_depend_on_batch_size(tiny_lm, token_mode):
    token_ids = random_probes(tiny_lm, 40, 12, 0)
    massive = 7  # this token's embedding is made 100x too large; every 5th probe ends in it
    for ids in token_ids[::5]:
        ids[-1] = massive
    embeddings = tiny_lm.model.get_input_embeddings().weight
    with torch.no_grad():
        embeddings[massive] *= 100.0
    probes = Probes("random", token_ids)
    results = [scan(tiny_lm, probes=probes, token_mode=token_mode, batch_size=b, progress=False) for b in (1, 7, 40)]
    dropped = {r.capture["sinks_dropped"] for r in results}
    assert len(dropped) == 1 and dropped.pop() >= 8
    for other in results[1:]:
        np.testing.assert_allclose(other.cka, results[0].cka, atol=1e-6)
