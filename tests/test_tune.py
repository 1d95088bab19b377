"""Fine-tuning chosen blocks, comparing layer choices, and validating a scan against fine-tuning."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import transformers

import critlayer
from critlayer import CritlayerError, TrainConfig
from critlayer.data.text import load_data
from critlayer.models.loss import collate, heldout_loss
from critlayer.prove.validate import Validation, restore_windows
from critlayer.train.finetune import make_optimizer
from critlayer.train.targets import freeze_except, lora_config, unfrozen_parameters
from critlayer.use.layers import choose_lens, parse_layers

FAST = TrainConfig(steps=3, batch_size=4, eval_every=2, lr=1e-2, n_eval=6, max_tokens=12)
LEARNS = replace(FAST, steps=20, eval_every=10)  # enough steps for the tiny model's held-out loss to fall for sure


@pytest.fixture
def lm(tiny_folder):
    return critlayer.load(str(tiny_folder))


@pytest.fixture
def data(lm, prompt_file):
    return load_data(lm, str(prompt_file), n_eval=FAST.n_eval, max_tokens=FAST.max_tokens)


@pytest.fixture
def scanned(lm):
    return critlayer.scan(lm, probes="random", n=12, max_tokens=10, progress=False)


def test_layer_specs(scanned):
    ranking = scanned.ranking()
    assert parse_layers("3,0-1", 6) == [0, 1, 3]
    assert parse_layers("all", 6) == list(range(6)) and parse_layers("none", 6) == []
    assert parse_layers("critical:2", 6, ranking=ranking) == sorted(ranking[:2])
    eligible = len(scanned.selection.eligible)
    non = parse_layers("noncritical:1", 6, ranking=ranking, eligible=eligible)
    assert non == [ranking[eligible - 1]]
    assert parse_layers("random:3", 6, seed=1) == parse_layers("random:3", 6, seed=1)
    for spec, message in [("9", "unknown block 9"), ("critical:7", "between 1 and the 6"), ("x", "bad layer spec"),
                          ("critical:2", "needs a scan")]:
        with pytest.raises(CritlayerError, match=message):
            parse_layers(spec, 6)


def test_only_named_blocks_change_and_frozen_ones_get_no_grads_or_state(lm, data, prompt_file):
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    result = critlayer.tune(lm, str(prompt_file), "1,4", config=FAST, progress=False)
    after = result.model.state_dict()
    for name, value in before.items():
        changed = not torch.equal(value, after[name])
        assert changed == name.startswith(("model.layers.1.", "model.layers.4.")), name
    assert all(torch.equal(v, lm.model.state_dict()[k]) for k, v in before.items())  # the original is untouched
    assert result.run.heldout_loss[-1][1] < result.run.heldout_loss[0][1]
    model = lm.model
    trainable = freeze_except(model, lm, [2])
    optimizer = make_optimizer(model, 1e-3)
    loss = model(**collate(data.train[:2], "cpu")).loss
    loss.backward()
    optimizer.step()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    state = {id(p) for p in optimizer.state}
    assert grads == set(trainable) and all(n.startswith("model.layers.2.") for n in trainable)
    assert state == {id(p) for n, p in model.named_parameters() if n in trainable}
    model.requires_grad_(True)


def test_saved_model_and_adapter_reload(lm, data, prompt_file, tmp_path):
    result = critlayer.tune(lm, str(prompt_file), "2", config=FAST, out=tmp_path / "full", progress=False)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "model")
    for key, value in result.model.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[key])
    tune_json = json.loads((tmp_path / "full" / "tune.json").read_text())
    assert tune_json["run"]["layers"] == [2] and (tmp_path / "full" / "loss.png").stat().st_size > 0

    lora = critlayer.tune(lm, str(prompt_file), "2,3", config=FAST, lora=True, out=tmp_path / "lora", progress=False)
    from peft import PeftModel

    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "model")
    base.load_state_dict(lm.model.state_dict())
    adapted = PeftModel.from_pretrained(base, tmp_path / "lora" / "adapter")
    names = [n for n, _ in adapted.named_parameters() if "lora_" in n]
    assert names and all(".layers.2." in n or ".layers.3." in n for n in names)
    assert heldout_loss(adapted, data.heldout) == pytest.approx(heldout_loss(lora.model, data.heldout), abs=1e-5)


def test_lora_config_and_axolotl_list_target_the_blocks(lm):
    config = lora_config(lm, [1])
    assert config.target_modules and all(t.startswith("model.layers.1.") for t in config.target_modules)
    assert unfrozen_parameters(lm, [1, 3]) == [r"^model\.layers\.1\..*", r"^model\.layers\.3\..*"]


def test_compare_runs_every_spec_from_the_same_start(lm, prompt_file, scanned, tmp_path):
    comparison = critlayer.tune(lm, str(prompt_file), compare=["critical:2", "noncritical:2", "random:2"], seeds=2,
                                scan=scanned, config=FAST, progress=False)
    starts = {runs[0].loss_before for runs in comparison.runs.values()}
    assert len(starts) == 1  # the same weights and held-out data before every run
    assert len(comparison.runs["random:2"]) == 2 and len(comparison.verdicts()) == 3
    comparison.save(tmp_path / "cmp")
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert saved["summary"]["critical:2"]["heldout_loss_after_std"] is not None


def test_restoring_every_block_gives_back_the_pretrained_loss(lm, data, prompt_file):
    result = critlayer.tune(lm, str(prompt_file), "all", config=FAST, progress=False)
    pretrained = heldout_loss(lm.model, data.heldout)
    assert heldout_loss(result.model, data.heldout) != pytest.approx(pretrained, abs=1e-4)
    tuned = {k: v.clone() for k, v in result.model.state_dict().items()}
    restored = restore_windows(lm, result.model, data, lm.num_layers, progress=False)
    assert restored == pytest.approx([pretrained], abs=1e-6)  # another model object: kernels may round apart
    assert all(torch.equal(v, result.model.state_dict()[k]) for k, v in tuned.items())  # the tuned weights are back


def test_validate_reports_every_score_with_depth_baselines_and_spread_over_seeds(lm, prompt_file, scanned, tmp_path):
    v = critlayer.validate(lm, str(prompt_file), scan=scanned, config=LEARNS, seeds=2, permutations=200,
                           progress=False)
    assert len(v.importance) == lm.num_layers and np.isfinite(v.importance).all()
    assert len(v.loss_tuned) == 2 and all(loss < v.loss_pretrained for loss in v.loss_tuned)
    assert np.allclose(v.importance, np.mean(v.importance_per_seed, axis=0))
    rows = v.correlations["importance"]
    assert {"delta", "block_influence", "depth", "depth_u_shape"} <= set(rows)
    assert all(0 < rows[n]["all_p"] <= 1 for n in rows)
    assert all(spread["all"] >= 0 for spread in v.spread().values())
    assert set(v.beyond_depth()) == set(scanned.scores) | {"consensus", "p_critical"} & set(scanned.scores)
    v.save(tmp_path / "v")
    for name in ("validate.json", "validate.png", "validate.html"):
        assert (tmp_path / "v" / name).stat().st_size > 0
    again = Validation.load(tmp_path / "v")
    assert json.dumps(again.to_json()) == json.dumps(v.to_json())  # NaN (depth's partial) is not equal to itself
    assert again.ranking("delta") == v.ranking("delta")


def test_critical_k_ranks_by_the_lens_a_validation_found_best(lm, prompt_file, scanned, tmp_path):
    v = critlayer.validate(lm, str(prompt_file), scan=scanned, config=LEARNS, permutations=50, progress=False)
    for table in [v.correlations, *v.seed_correlations]:  # make one lens predict importance beyond depth
        table["importance"]["block_influence"].update(partial=0.9, partial_p=0.001)
    assert v.best_lens == "block_influence"
    result = critlayer.tune(lm, str(prompt_file), "critical:2", validation=v, config=FAST, progress=False)
    assert result.run.layers == sorted(v.ranking("block_influence")[:2])
    assert result.to_json()["lens"]["score"] == "block_influence" and "validation" in result.table()
    with pytest.raises(CritlayerError, match="not both"):
        critlayer.tune(lm, str(prompt_file), "critical:2", validation=v, score="delta", config=FAST, progress=False)
    for table in [v.correlations, *v.seed_correlations]:  # now none does: the scan's selection score ranks
        for row in table["importance"].values():
            row.update(partial=0.0, partial_p=1.0)
    lens = choose_lens(None, v)
    assert v.best_lens is None and lens.score == scanned.selection.score and "no lens" in lens.reason
    exported = critlayer.export(scanned, layers="noncritical:2", validation=v)
    assert json.loads(exported) == sorted(v.ranking(lens.score)[:len(v.interior)][-2:])


def test_a_finetune_that_does_not_help_is_flagged(lm, prompt_file):
    result = critlayer.tune(lm, str(prompt_file), "all", config=replace(FAST, lr=1e-9), progress=False)
    assert not result.run.lowered_loss
    assert len(result.warnings) == 1 and "did not lower the held-out loss" in result.warnings[0]
    assert result.to_json()["warnings"] == result.warnings and "warning:" in result.table()
    learned = critlayer.tune(lm, str(prompt_file), "all", config=LEARNS, progress=False)
    assert learned.run.lowered_loss and learned.warnings == []


def test_tuned_checkpoint_of_another_architecture_is_refused(lm, prompt_file, scanned):
    from conftest import tiny_model

    with pytest.raises(CritlayerError, match="same model"):
        critlayer.validate(lm, str(prompt_file), scan=scanned, config=FAST, tuned=tiny_model("qwen2"), progress=False)


def test_bad_data(lm, tmp_path):
    empty = tmp_path / "e.txt"
    empty.write_text("\n")
    with pytest.raises(CritlayerError, match="empty"):
        load_data(lm, str(empty), n_eval=4, max_tokens=16)
    few = tmp_path / "few.txt"
    few.write_text("w1 w2\nw3 w4\nw5\n")
    with pytest.raises(CritlayerError, match="held-out data too small"):
        load_data(lm, str(few), n_eval=32, max_tokens=16)
