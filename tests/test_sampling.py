"""Layer sampling while fine-tuning (``sample:K``, LISA): draws, switching blocks, optimizer state, refusals."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import critlayer
from critlayer import CritlayerError, TrainConfig
from critlayer.cli import main
from critlayer.train.sampling import LayerSchedule, draw_weights
from critlayer.use.layers import Lens

FAST = TrainConfig(steps=4, batch_size=4, eval_every=2, lr=1e-2, n_eval=6, max_tokens=12, every=1, warmup=0,
                   schedule="constant")  # every step moves the weights it trains


@pytest.fixture
def lm(tiny_folder):
    return critlayer.load(str(tiny_folder))


def _block(name: str) -> int | None:
    return int(name.split(".")[2]) if name.startswith("model.layers.") else None


def test_draw_weights_and_schedule():
    lens = Lens("delta", ranking=[3, 1, 4, 2, 0, 5], eligible=4, reason="")
    assert np.allclose(draw_weights(6, "uniform"), 1 / 6)
    critical = draw_weights(6, "critical", lens)
    assert np.isclose(critical.sum(), 1) and list(np.argsort(-critical)) == lens.ranking
    noncritical = draw_weights(6, "noncritical", lens)
    assert list(np.argsort(-noncritical)) == [2, 4, 1, 3, 0, 5]  # eligible reversed, then the rest
    schedule = LayerSchedule.drawn(critical, k=2, every=3, steps=100, seed=0)
    assert len(schedule.draws) == 34 and all(len(set(d)) == 2 for d in schedule.draws)
    assert schedule.active(1) == schedule.draws[0] and schedule.active(4) == schedule.draws[1]
    assert [s for s in range(1, 11) if schedule.redraws_at(s)] == [4, 7, 10]
    counts = np.bincount(np.concatenate(schedule.draws), minlength=6)
    assert counts[3] > counts[5]  # the most critical block is drawn more often than the least
    assert LayerSchedule.drawn(critical, 2, 3, 100, seed=0) == schedule  # the seed fixes every draw


def test_every_drawn_block_changes_and_the_optimizer_holds_state_for_active_blocks_only(lm, prompt_file):
    states: list[set[int]] = []
    hook = register_optimizer_step_post_hook(
        lambda optimizer, args, kwargs: states.append({id(p) for p in optimizer.state}))
    try:
        result = critlayer.tune(lm, str(prompt_file), "sample:2", config=replace(FAST, steps=6), progress=False)
    finally:
        hook.remove()
    run = result.run
    assert len(run.draws) == 6 and run.layers == sorted(set().union(*run.draws)) and len(run.layers) > 2
    named = dict(result.model.named_parameters())
    for step, (draw, held) in enumerate(zip(run.draws, states), start=1):
        expected = {id(p) for name, p in named.items() if _block(name) in draw}
        assert held == expected, f"step {step}: optimizer state beyond the active blocks {draw}"
    original = lm.model.state_dict()
    for name, value in result.model.state_dict().items():
        assert torch.equal(value, original[name]) == (_block(name) not in run.layers), name
    per_block = sum(p.numel() for n, p in named.items() if _block(n) == 0)
    assert run.trainable_parameters == 2 * per_block
    assert run.loss_after < run.loss_before


def test_a_block_that_returns_starts_from_fresh_moments_and_one_that_stays_keeps_them(lm, prompt_file):
    counts: list[dict[int, float]] = []  # after each step: Adam's step count per parameter with state
    hook = register_optimizer_step_post_hook(
        lambda optimizer, args, kwargs: counts.append({id(p): float(s["step"]) for p, s in optimizer.state.items()}))
    try:
        result = critlayer.tune(lm, str(prompt_file), "sample:3", config=replace(FAST, steps=8), progress=False)
    finally:
        hook.remove()
    draws, named = result.run.draws, dict(result.model.named_parameters())
    returned = 0
    for j in range(1, len(draws)):
        for block in draws[j]:
            param = id(next(p for n, p in named.items() if _block(n) == block))
            stayed = block in draws[j - 1]
            assert counts[j][param] == (counts[j - 1][param] + 1 if stayed else 1)
            returned += not stayed and any(block in draw for draw in draws[:j - 1])
    assert returned  # some block left and came back


def test_embeddings_train_beside_the_draws_and_lora_runs_in_a_comparison(lm, prompt_file, tmp_path):
    result = critlayer.tune(lm, str(prompt_file), sample=1, config=replace(FAST, embeddings=True), progress=False)
    original = lm.model.state_dict()
    tuned = result.model.state_dict()
    assert not torch.equal(tuned["model.embed_tokens.weight"], original["model.embed_tokens.weight"])
    assert not torch.equal(tuned["model.norm.weight"], original["model.norm.weight"])
    comparison = critlayer.tune(lm, str(prompt_file), compare="all,lora:all,sample:2", config=FAST, progress=False)
    runs = {spec: runs[0] for spec, runs in comparison.runs.items()}
    assert runs["lora:all"].trainable_parameters < runs["sample:2"].trainable_parameters < runs[
        "all"].trainable_parameters
    assert runs["sample:2"].draws and runs["all"].draws is None and "sample:2" in comparison.table()
    assert comparison.settings["train_by_spec"]["lora:all"]["lora"] and set(comparison.settings["train_by_spec"]) == {
        "lora:all"}
    comparison.save(tmp_path / "cmp")
    again = type(comparison).load(tmp_path / "cmp")
    assert again.runs["sample:2"][0].draws == runs["sample:2"].draws


def test_the_command_line_samples_weighted_by_the_scan(lm, tiny_folder, prompt_file, tmp_path):
    scanned = critlayer.scan(lm, probes="random", n=12, max_tokens=10, progress=False, out=tmp_path / "scan")
    assert main(["tune", str(tiny_folder), "--data", str(prompt_file), "--sample", "2", "--by", "critical",
                 "--scan", str(tmp_path / "scan"), "--steps", "4", "--every", "2", "--batch-size", "4", "--n-eval",
                 "6", "--max-tokens", "12", "--quiet", "--out", str(tmp_path / "t")]) == 0
    saved = json.loads((tmp_path / "t" / "tune.json").read_text())
    assert saved["spec"] == "sample:2:critical" and saved["lens"]["score"] == scanned.selection.score
    assert len(saved["run"]["draws"]) == 2 and saved["train"]["every"] == 2


@pytest.mark.parametrize("call, message", [
    (dict(layers="sample:0"), "between 1 and the 6"),
    (dict(layers="sample:2:most"), "bad layer spec"),
    (dict(sample=2, lora=True), "does not go with LoRA"),
    (dict(layers="all", embeddings=True, lora=True), "does not go with LoRA"),
    (dict(by="critical"), "give --sample K too"),
    (dict(layers="all", sample=2), "not both"),
    (dict(sample=2, compare="all,random:2"), "in --compare write sample:K"),
    (dict(sample=2, by="delta", score="consensus"), "not both"),
])
def test_bad_sampling_is_refused_in_one_line(lm, prompt_file, call, message):
    with pytest.raises(CritlayerError, match=message):
        critlayer.tune(lm, str(prompt_file), config=FAST, progress=False, **call)


def test_commands_that_train_fixed_whole_blocks_refuse_embeddings(lm, prompt_file):
    with pytest.raises(CritlayerError, match="drop embeddings"):
        critlayer.validate(lm, str(prompt_file), config=replace(FAST, embeddings=True), progress=False)
    with pytest.raises(CritlayerError, match="drop embeddings"):
        critlayer.DefendConfig(embeddings=True)
