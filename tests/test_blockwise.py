"""Plans evaluated one block at a time give what the whole model gives with every plan's weights swapped in, while
holding one block's quantized weights at a time."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch

from conftest import tiny_model, tiny_tokenizer
from critlayer import LanguageModel
from critlayer.use.blockwise import evaluate_plans, schedule, texts_per_chunk
from critlayer.use.evaluation import evaluate
from critlayer.use.quantizers import parse_widths
from critlayer.use.weights import BlockWeights


def test_plans_sharing_blocks_share_their_passes_and_one_change_finishes_at_once():
    order = schedule([(0, 0), (0, 1)], [0, 1], 2)
    assert [[(s.widths, s.moves, s.finished) for s in steps] for steps in order.blocks] == [
        [({0: 0}, [(0, 1)], [])], [({1: 0}, [(1, 2)], [2]), ({1: 1}, [(1, 3)], [3])]]
    assert order.passes() == 1 + (1 + 2) / 2 and order.peak() == 3  # both finished children wait to be scored
    alone = schedule([(1, None, None), (None, 0, None)], [0, 1, 2], 3)
    first = alone.blocks[0]
    assert [s.widths for s in first] == [{}, {0: 1}] and first[1].finished == [2]  # runs on to the end at once
    assert alone.members[2] == [(1, None, None)] and alone.passes() == 1 + (2 + 2 + 1 + 1) / 3
    assert alone.peak() == 3  # the unchanged trunk, its next step, and one branch running on: not every plan


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_blockwise_scores_match_the_whole_model_with_each_plan_swapped_in(arch, monkeypatch):
    lm = LanguageModel.wrap(tiny_model(arch), tiny_tokenizer(), name=f"tiny-{arch}")
    weights = BlockWeights(lm, parse_widths("Q4_0,Q8_0", "gguf"))
    rng = np.random.default_rng(0)
    texts = [[1, *rng.integers(4, 64, size=int(n)).tolist()] for n in rng.integers(6, 30, size=7)]
    plans = {"alone 2": [None, None, 0, None, None, None], "alone 4": [None, None, None, None, 1, None],
             "mixed": [0, 1, 0, 1, 0, 1], "same as mixed": [0, 1, 0, 1, 0, 1], "all low": [0] * 6}
    whole = {name: (lambda plan=plan: weights.at({u: k for u, k in enumerate(plan) if k is not None}))
             for name, plan in plans.items()}
    expected_reference, expected = evaluate(lm, texts, whole, progress=False)

    entered, depth = [], [0]
    at = weights.at

    @contextmanager
    def watched(widths):
        depth[0] += 1
        entered.append((depth[0], {weights.blocks[u] for u in widths}))
        with at(widths):
            yield
        depth[0] -= 1

    monkeypatch.setattr(weights, "at", watched)
    assert texts_per_chunk(lm, texts, 1) >= len(texts) and texts_per_chunk(lm, texts, 10 ** 6) == 1
    monkeypatch.setattr("critlayer.use.blockwise.texts_per_chunk", lambda *_: 1)  # chunks of one text join up
    reference, scores, passes = evaluate_plans(lm, texts, plans, weights, compute=torch.no_grad, progress=False)

    assert all(d == 1 and len(blocks) <= 1 for d, blocks in entered)  # one block's weights swapped at a time
    for got, want in [(reference, expected_reference), *((scores[n], expected[n]) for n in plans)]:
        for name in ("loss", "kl", "agree", "tokens"):
            np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-4, atol=1e-5)
    assert scores["mixed"].kl.sum() > 0 and scores["alone 2"].kl.sum() > 0
    assert 2 < passes < 1 + len(plans)  # shared prefixes and early finishes cost less than a pass per plan
