"""One pass, firm answers, rounds and probe files: generated probes captured while they are written equal a
second forward over them; probes are the same whatever the batch or the number asked for; a planted shift
comes out firm, a model without structure does not; a scan reruns from the probes it saved."""

import json

import numpy as np
import pytest
import torch

from critlayer import CritlayerError, LanguageModel, export, load, scan
from critlayer.find.firmness import ROUND
from critlayer.find.probes import make_probes, random_probes
from critlayer.find.sampler import write_probes

from conftest import TINY, tiny_model, tiny_tokenizer

CAUSAL = sorted(arch for arch in TINY if arch != "bert")


@pytest.mark.parametrize("arch", CAUSAL)
def test_one_pass_equals_a_second_forward_over_the_same_probes(arch):
    """20 tokens: past gemma3's sliding window of 8, and with end tokens drawn early in some probes."""
    lm = LanguageModel.wrap(tiny_model(arch), tiny_tokenizer(), name=arch)
    for mode in ("last", "all", "mean"):
        options = dict(n=24, max_tokens=20, seed=3, token_mode=mode, progress=False)
        one = scan(lm, probes="generated", **options)
        probes = make_probes(lm, "generated", n=24, max_tokens=20, seed=3, progress=False)
        two = scan(lm, probes=probes, **{k: v for k, v in options.items() if k not in ("n", "max_tokens")})
        assert one.probes["one_pass"] and not two.probes["one_pass"]
        assert one.probe_ids.token_ids == probes.token_ids
        assert min(map(len, probes.token_ids)) < 20 == max(map(len, probes.token_ids))  # some ended early
        assert one.capture == two.capture
        np.testing.assert_allclose(one.cka, two.cka, atol=1e-5)
        for name in two.scores:
            np.testing.assert_allclose(one.scores[name], two.scores[name], atol=1e-5, err_msg=f"{arch} {mode} {name}")


def test_a_probe_is_the_same_whatever_its_batch_and_however_many_are_asked(tiny_lm):
    every = write_probes(tiny_lm, range(10), 16, seed=5)
    assert write_probes(tiny_lm, range(4), 16, seed=5) == every[:4]
    assert write_probes(tiny_lm, [6, 7], 16, seed=5) == every[6:8]
    assert write_probes(tiny_lm, range(4), 16, seed=6) != every[:4]
    assert all(2 <= len(ids) <= 16 and ids[0] == 1 and 2 not in ids for ids in every)


def test_a_scan_reruns_from_the_probe_file_it_saved(tiny_folder, tmp_path):
    lm = load(tiny_folder)
    first = scan(lm, n=16, max_tokens=12, progress=False, out=tmp_path / "first")
    assert (tmp_path / "first" / "firmness.png").stat().st_size > 0
    assert "P(picked)" in (tmp_path / "first" / "report.html").read_text()
    saved = json.loads((tmp_path / "first" / "probes.json").read_text())
    assert saved["token_ids"] == first.probe_ids.token_ids and saved["tokenizer"] == first.probes["tokenizer"]
    again = scan(lm, probes=str(tmp_path / "first" / "probes.json"), n=16, progress=False)
    assert again.probe_ids.token_ids == first.probe_ids.token_ids
    for name in first.scores:
        np.testing.assert_allclose(again.scores[name], first.scores[name], atol=1e-5)
    other = LanguageModel.wrap(tiny_model("llama"), None, name="no tokenizer")
    with pytest.raises(CritlayerError, match="another tokenizer"):
        scan(other, probes=str(tmp_path / "first" / "probes.json"), progress=False)
    (tmp_path / "bad.json").write_text(json.dumps({"token_ids": [[1, "x"]]}))
    with pytest.raises(CritlayerError, match="not a critlayer probe file"):
        scan(lm, probes=str(tmp_path / "bad.json"), progress=False)


def _planted(layers: int = 10, shifted: int = 5) -> LanguageModel:
    """A tiny Llama whose block ``shifted`` adds to the residual stream a large, quickly varying function of it
    (which shares little linear structure with it), and the blocks after it carry on."""
    model = tiny_model("llama", layers)
    mix = torch.randn(32, 32, generator=torch.Generator().manual_seed(0))
    model.model.layers[shifted].register_forward_hook(
        lambda module, args, out: out + 10 * out.norm(dim=-1, keepdim=True) * torch.sin(20 * out @ mix))
    return LanguageModel.wrap(model, tiny_tokenizer(), name="planted")


def test_a_planted_shift_comes_out_firm_and_a_model_without_structure_does_not():
    planted = _planted()
    probes = random_probes(planted, 256, 12, 0)
    result = scan(planted, probes=_as_probes(probes), max_n=256, progress=False)
    assert result.firmness.firm == [4, 5]  # delta's valley: the pairs within 2 blocks that straddle the shift
    assert [result.firmness.replication[b] for b in (4, 5)] == [1.0, 1.0]
    assert result.critical == result.firmness.firm and export(result) == "[4, 5]\n"
    assert result.firmness.stopped.startswith("settled") and len(result.firmness.rounds) >= 2
    assert [r.probes for r in result.firmness.rounds] == [ROUND * (i + 1) for i in range(len(result.firmness.rounds))]

    flat = LanguageModel.wrap(tiny_model("llama", 10), tiny_tokenizer(), name="no structure")  # random blocks
    result = scan(flat, probes=_as_probes(random_probes(flat, 256, 12, 0)), max_n=128, progress=False)
    assert result.firmness.firm == [] and result.critical == [] and "no block is firm" in result.answer()
    assert sorted(result.ranking()) == list(range(10))  # critical:K still ranks every block by score
    with pytest.raises(CritlayerError, match="no block of this scan is firm"):
        export(result)


def test_an_adaptive_scan_reads_the_same_first_probes_as_a_fixed_one(tiny_lm):
    adaptive = scan(tiny_lm, max_tokens=10, max_n=96, progress=False)
    fixed = scan(tiny_lm, n=64, max_tokens=10, progress=False)
    assert adaptive.probe_ids.token_ids[:64] == fixed.probe_ids.token_ids
    assert len(adaptive.probe_ids) == adaptive.firmness.rounds[-1].probes <= 96


def _as_probes(token_ids):
    from critlayer.find.probes import Probes

    return Probes("random", token_ids)


def test_every_half_at_once_equals_delta_of_that_half_alone():
    """The halves' deltas come from quadratic forms in a mask matrix over probes (two or three rows each); each
    must equal delta from the reference CKA (float64, re-centred) of the rows that half keeps."""
    from critlayer.find.firmness import half_deltas
    from critlayer.find.measures.cka import delta_scores, linear_cka

    generator = torch.Generator().manual_seed(0)
    base = torch.randn(40, 16, generator=generator)
    rows = torch.stack([base + 0.3 * layer * torch.randn(40, 16, generator=generator) for layer in range(6)])
    row_probe = torch.randperm(40, generator=generator) % 16  # probes 0-7 have three rows, 8-15 two
    halves = torch.rand(16, 5, generator=generator) < 0.5
    deltas = half_deltas(rows, row_probe, halves.float(), window=2)
    for r in range(5):
        kept = rows[:, halves[row_probe, r]]
        cka = np.array([[linear_cka(kept[a], kept[b]) for b in range(6)] for a in range(6)])
        np.testing.assert_allclose(deltas[r], delta_scores(cka, 2), atol=1e-5)


def test_blocks_picked_in_some_halves_but_not_most_are_undecided_and_said():
    from critlayer.find.firmness import Firmness

    firmness = Firmness("delta", [0.0, 0.3, 0.6, 0.95, 0.05], 200, "read the 64 probes asked for")
    assert (firmness.firm, firmness.tentative, firmness.undecided) == ([3], [2], [1, 2])
    assert Firmness.from_json(firmness.to_json()).undecided == [1, 2]


def test_blocks_are_classed_by_how_often_another_scan_would_pick_them_where_measured():
    """Block 1 is picked by 95% of one scan's halves but would be by another scan in only 80% of cases: tentative,
    not firm; bootstrap firmness (no replication) is classed by its replicates."""
    from critlayer.find.firmness import Firmness

    firmness = Firmness("delta", [0.0, 0.95, 1.0], 200, "read the 64 probes asked for", replication=[0.0, 0.8, 1.0])
    assert (firmness.firm, firmness.tentative) == ([2], [1])
    assert Firmness.from_json(firmness.to_json()).firm == [2]
    assert Firmness("consensus", [0.0, 0.95], 100, "read").firm == [1]
    saved = {**firmness.to_json(), "firm": [1, 2]}
    del saved["classed_by"]  # written before firmness was read from the replicas: it stays as it was saved
    assert Firmness.from_json(saved).firm == [1, 2]


def test_a_scan_does_not_stop_while_a_block_is_tentative():
    """The same firm blocks two rounds running settle a scan only when no block sits between tentative and firm."""
    from critlayer.find.firmness import should_stop, summarise

    def round_(probes, chance):
        return summarise(probes, chance, chance)

    steady = [round_(64, [0.0, 1.0, 0.05]), round_(128, [0.0, 1.0, 0.0])]
    assert should_stop(steady)
    assert not should_stop([round_(64, [0.0, 1.0, 0.6]), round_(128, [0.0, 1.0, 0.0])])
    assert not should_stop([round_(64, [0.0, 1.0, 0.0]), round_(128, [0.0, 1.0, 0.85])])
    assert not should_stop([round_(64, [0.0, 0.95, 0.0]), round_(128, [0.0, 1.0, 0.95])])  # firm set changed
    by_replicas = summarise(128, [0.0, 1.0, 0.95], [0.0, 1.0, 0.6])  # firm in the halves, tentative in the replicas
    assert (by_replicas.firm, by_replicas.tentative) == ([1], [2])
    assert not should_stop([round_(64, [0.0, 1.0, 0.0]), by_replicas])


def test_replicas_lie_sqrt2_times_farther_from_the_whole_than_halves():
    """Another scan is simulated as the whole profile (every row) plus sqrt(2) times a half's deviation from it."""
    from critlayer.find.firmness import REPLICA_SPREAD, delta_picks, half_deltas
    from critlayer.find.measures.rows import Batch, RowSample

    generator = torch.Generator().manual_seed(1)
    base = torch.randn(60, 8, generator=generator)
    states = torch.stack([base + 0.4 * layer * torch.randn(60, 8, generator=generator) for layer in range(7)])
    probe = np.arange(60) // 3
    sample = RowSample(64)
    sample.update(Batch(states, torch.rand(60, generator=generator, dtype=torch.float64), probe))
    seen: list[np.ndarray] = []
    picks = delta_picks(sample, lambda delta: seen.append(delta) or [int(np.argmin(delta))], 2, 0, replicates=4)
    assert len(picks.halves) == len(picks.replicas) == 4 and len(seen) == 8
    order = np.unique(sample.row_samples(), return_inverse=True)[1]
    whole = half_deltas(sample.compute()[1:], torch.from_numpy(order), torch.ones(20, 1), 2)[0]
    for half, replica in zip(seen[:4], seen[4:]):
        np.testing.assert_allclose(replica, whole + REPLICA_SPREAD * (half - whole), atol=1e-5)  # other mask shape
        assert not np.allclose(half, whole)


def test_halves_too_small_to_estimate_pick_nothing(tiny_lm):
    """Four probes, one row each: a half holds two rows, where the unbiased estimator has no value; the rule must
    not pick from a NaN profile (top-k would pick arbitrary blocks)."""
    result = scan(tiny_lm, n=4, max_tokens=6, token_mode="last", k=2, progress=False)
    assert result.firmness.probability == [0.0] * len(result.layers) and result.firmness.firm == []
    assert result.firmness.replication == [0.0] * len(result.layers)
