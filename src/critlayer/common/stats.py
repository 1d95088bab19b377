"""Rank statistics (Spearman, plain and partial, set overlap, vectorised permutation tests, the table of lenses
against a target) and confidence intervals for small samples."""

from __future__ import annotations

import numpy as np


def ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties sharing their average rank."""
    values = np.asarray(values, dtype=float)
    order = np.argsort(values, kind="mergesort")
    ranked = np.empty(len(values))
    ranked[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):
        tied = values == value
        if tied.sum() > 1:
            ranked[tied] = ranked[tied].mean()
    return ranked


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (NaN when either side is constant)."""
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def jaccard(a: list[int], b: list[int]) -> float:
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 1.0


def permutation_pvalue(a: np.ndarray, b: np.ndarray, covariates: np.ndarray | None = None, n: int = 5000,
                       seed: int = 0) -> float:
    """Two-sided p-value of Spearman's correlation of a and b (partial when ``covariates`` are given)
    against random pairings of a and b: the permuted ranks of a go through one matrix product."""
    ra, rb = ranks(a), ranks(b)
    design = np.column_stack([np.ones(len(ra))] + ([] if covariates is None else [covariates]))
    residual = np.eye(len(ra)) - design @ np.linalg.pinv(design)  # what least squares on the design leaves
    rb = residual @ rb
    rng = np.random.default_rng(seed)
    permuted = np.stack([ra, *(ra[rng.permutation(len(ra))] for _ in range(n))]) @ residual
    norms = np.linalg.norm(permuted, axis=1) * np.linalg.norm(rb)
    if norms[0] < 1e-12:
        return float("nan")
    stats = np.abs(permuted @ rb) / np.maximum(norms, 1e-300)
    return float(((stats[1:] >= stats[0] - 1e-12).sum() + 1) / (n + 1))


def residualise(values: np.ndarray, covariates: np.ndarray) -> np.ndarray:
    """What is left of ``values`` after least squares on ``covariates`` (plus an intercept)."""
    design = np.column_stack([np.ones(len(values)), covariates])
    coef, *_ = np.linalg.lstsq(design, values, rcond=None)
    return values - design @ coef


def partial_spearman(a: np.ndarray, b: np.ndarray, covariates: np.ndarray) -> float:
    """Spearman correlation of a and b with the covariates regressed out of both sets of ranks."""
    ra, rb = residualise(ranks(a), covariates), residualise(ranks(b), covariates)
    if ra.std() < 1e-12 or rb.std() < 1e-12:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% by default); sound at 0 and n successes too."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, float(centre - half)), min(1.0, float(centre + half)))


def bootstrap_ratio_interval(sums: np.ndarray, counts: np.ndarray, n: int = 2000, seed: int = 0,
                             level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of sum(sums) / sum(counts), resampling items (e.g. a per-token loss)."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(sums), size=(n, len(sums)))
    ratios = sums[picks].sum(1) / counts[picks].sum(1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return (float(low), float(high))


def paired_difference_interval(sums_a: np.ndarray, sums_b: np.ndarray, counts: np.ndarray, n: int = 2000,
                               seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of sum(a)/sum(counts) - sum(b)/sum(counts), resampling items that a and b
    share (the same texts scored two ways), so that what the items have in common cancels."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(counts), size=(n, len(counts)))
    differences = (sums_a - sums_b)[picks].sum(1) / counts[picks].sum(1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(differences, [tail, 100 - tail])
    return (float(low), float(high))


def lens_correlations(scores: dict[str, np.ndarray], targets: dict[str, np.ndarray], interior: list[int],
                      permutations: int = 5000) -> dict:
    """Spearman of every score (and the depth baselines a score must beat: depth, and distance from the middle)
    with every target, over all blocks, over ``interior`` ones only, and with depth regressed out (partial), each
    with a permutation p-value. Validation, pruning and quantization report their lenses in this one shape."""
    n = len(next(iter(targets.values())))
    depth = np.arange(n) / max(1, n - 1)
    predictors = {**scores, "depth": depth, "depth_u_shape": np.abs(depth - 0.5)}
    covariates = np.column_stack([depth, (depth - 0.5) ** 2])
    inner = np.array(interior)

    def pvalue(a, b, partial=False):
        return permutation_pvalue(a, b, covariates if partial else None, n=permutations)

    out = {}
    for target_name, target in targets.items():
        rows = {}
        for name, values in predictors.items():
            values = np.asarray(values, dtype=float)
            rows[name] = {
                "all": spearman(values, target), "all_p": pvalue(values, target),
                "interior": spearman(values[inner], target[inner]),
                "interior_p": pvalue(values[inner], target[inner]),
                "partial": np.nan if name.startswith("depth") else partial_spearman(values, target, covariates),
                "partial_p": np.nan if name.startswith("depth") else pvalue(values, target, partial=True),
            }
        out[target_name] = {k: {m: round(float(v), 4) for m, v in r.items()} for k, r in rows.items()}
    return out
