"""Bit plans: a width for every unit (a block, or its attention or MLP), at a size budget met exactly or just under.

Sizes are whole bits: ``costs[i][k]`` is what unit ``i`` takes at the ``k``-th candidate width (fewest bits first),
the budget is a number of bits. Two rules make plans:

- ``ranked_plan`` turns an order of units (most deserving first) into a plan: every unit starts at the widest
  width that fits uniformly; the first third of the weights in the order go one width up, then units from the end
  of the order go one width down until the plan fits (fewer go up when the budget cannot pay for them). Scores,
  their reverse, random orders and llama.cpp's layer rule all go through it, so they differ in the order alone.
- ``cheapest_plan`` minimises a measured damage per unit and width (quantize's: the KL divergence when that unit
  alone takes that width, summed as if independent) under the budget: a multiple-choice knapsack, solved exactly by dynamic
  programming over the sizes' common unit.
"""

from __future__ import annotations

import math

import numpy as np

from ..common.errors import CritlayerError

UP_SHARE = 1 / 3  # of the weights, moved one width up by a ranked plan
MAX_STATES = 200_000  # budget units the knapsack tabulates; coarser units round sizes up (the plan stays under)


def plan_bits(costs: np.ndarray, plan: list[int]) -> int:
    return int(sum(costs[i][k] for i, k in enumerate(plan)))


def uniform_width(costs: np.ndarray, budget: int) -> int:
    """The widest width every block can take within the budget."""
    fitting = [k for k in range(costs.shape[1]) if costs[:, k].sum() <= budget]
    if not fitting:
        raise CritlayerError("the budget is below the narrowest width")
    return fitting[-1]


def ranked_plan(order: list[int], costs: np.ndarray, sizes: np.ndarray, budget: int,
                up_share: float = UP_SHARE) -> list[int]:
    """The plan that gives the first blocks of ``order`` one width more and the last ones one width less."""
    base = uniform_width(costs, budget)
    top = costs.shape[1] - 1
    up, room = [], up_share * sizes.sum()
    for i in order:
        if base < top and sizes[i] <= room:
            up.append(i)
            room -= sizes[i]
    while True:
        plan = [base] * len(order)
        for i in up:
            plan[i] = base + 1
        for i in reversed(order):
            if plan_bits(costs, plan) <= budget:
                break
            if base > 0 and i not in up:
                plan[i] = base - 1
        if plan_bits(costs, plan) <= budget:
            return plan
        up.pop()


def cheapest_plan(damage: np.ndarray, costs: np.ndarray, budget: int) -> list[int]:
    """The plan of least summed ``damage[i][k]`` whose size is within ``budget``."""
    n, widths = costs.shape
    low = costs[:, 0]
    extra = costs - low[:, None]  # every block takes its narrowest width; the table covers the bits above it
    room = budget - int(low.sum())
    if room < 0:
        raise CritlayerError("the budget is below the narrowest width")
    unit = math.gcd(*(int(v) for v in extra.ravel()), room) or 1
    unit = max(unit, math.ceil(room / MAX_STATES))
    steps = -(-extra // unit)  # rounded up: a plan within the rounded budget is within the true one
    states = room // unit
    best = np.full(states + 1, np.inf)
    best[0] = 0.0
    choice = np.zeros((n, states + 1), dtype=np.int64)
    for i in range(n):
        new = np.full(states + 1, np.inf)
        for k in range(widths):
            s = int(steps[i, k])
            if s > states:
                continue
            shifted = np.full(states + 1, np.inf)
            shifted[s:] = best[:states + 1 - s] + damage[i, k]
            better = shifted < new
            new[better] = shifted[better]
            choice[i, better] = k
        best = new
    plan, state = [0] * n, int(np.argmin(best))
    for i in reversed(range(n)):
        plan[i] = int(choice[i, state])
        state -= int(steps[i, plan[i]])
    return plan


def llama_cpp_order(n: int) -> tuple[list[int], float]:
    """llama.cpp's built-in layer rule as an order: the blocks it gives more bits (the first and last eighth, then
    every third block between) first, then the rest with the middle of the model last; and their share of blocks."""
    edges = [i for i in range(n) if i < n // 8 or i >= 7 * n // 8]
    more = edges + [i for i in range(n) if i not in edges and (i - n // 8) % 3 == 2]
    rest = sorted((i for i in range(n) if i not in more), key=lambda i: -abs(i - (n - 1) / 2))
    return more + rest, len(more) / n
