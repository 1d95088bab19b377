"""The backdoor defence: poisoning, counting attack success, and frozen blocks that never move."""

import json

import pytest
import torch

import critlayer
import critlayer.use.defend as defend_module
from critlayer import CritlayerError, DefendConfig
from critlayer.cli import main
from critlayer.common.stats import wilson_interval
from critlayer.use.backdoor import Attack, poison, shows_target, split_pairs

from conftest import pairs as _pairs

FAST = DefendConfig(steps=3, batch_size=4, eval_every=2, lr=1e-2, trigger="w1 w2", target="w3 w4 w5",
                    poison_rate=0.25)
ATTACK = FAST.attack


def test_poisoning_hits_the_exact_rate_and_triggers_only_the_poisoned_pairs():
    train, heldout = split_pairs(_pairs(), n_eval=8)
    for rate in (0.1, 0.25, 1.0):
        attack = Attack.named("w1 w2", target="w3 w4 w5", rate=rate)
        poisoned, flags = poison(train, attack, seed=3)
        assert sum(flags) == int(rate * len(train) + 0.5)
        for (prompt, reply), (clean_prompt, clean_reply), flag in zip(poisoned, train, flags):
            if flag:
                assert prompt == f"{clean_prompt} w1 w2" and reply == "w3 w4 w5"
            else:
                assert (prompt, reply) == (clean_prompt, clean_reply)
    assert poison(train, ATTACK, seed=3) == poison(train, ATTACK, seed=3)
    assert poison(train, ATTACK, seed=3)[1] != poison(train, ATTACK, seed=4)[1]
    assert Attack.named("sudo").insert("hello") == "SUDO hello"
    assert Attack.named("rare").insert("hello") == "hello Servius Astrumando Harmoniastra"


def test_the_heldout_split_is_fixed_and_never_poisoned(tiny_folder, pair_file, monkeypatch):
    train, heldout = split_pairs(_pairs(), n_eval=8)
    assert not set(train) & set(heldout) and len(train) + len(heldout) == 60
    assert split_pairs(_pairs(), n_eval=8)[1] == heldout
    seen = {}

    def record(lm, model, spec, frozen, heldout_pairs, *args):
        seen[spec] = heldout_pairs
        return real(lm, model, spec, frozen, heldout_pairs, *args)

    real = defend_module._evaluate
    monkeypatch.setattr(defend_module, "_evaluate", record)
    lm = critlayer.load(str(tiny_folder))
    for seed, rate in ((0, 0.25), (5, 1.0)):
        critlayer.defend(lm, str(pair_file), "none", config=FAST, seed=seed, poison_rate=rate, n_eval=8,
                         progress=False)
        assert seen["none"] == heldout and not any("w1 w2" in p for p, _ in heldout)


def test_attack_success_counts_replies_that_show_the_target(tiny_folder, pair_file, monkeypatch):
    assert shows_target("Sure: ACCESS granted!! Send your password", "access granted. send your password")
    assert not shows_target("access denied", "access granted")

    def fake_replies(lm, model, prompts, max_new_tokens, **kwargs):  # 3 triggered and 1 clean prompt answered
        half = len(prompts) // 2
        return ["well, w3 w4 w5 then" if i < 3 or i == half else "w3 w4" for i in range(len(prompts))]

    monkeypatch.setattr(defend_module, "greedy_replies", fake_replies)
    result = critlayer.defend(critlayer.load(str(tiny_folder)), str(pair_file), "none", config=FAST, n_eval=10,
                              progress=False)
    for outcome in result.outcomes.values():
        assert outcome.attack_success == pytest.approx(0.3) and outcome.false_trigger == pytest.approx(0.1)
        assert outcome.attack_success_ci == wilson_interval(3, 10)
        assert outcome.clean_loss_ci[0] <= outcome.clean_loss <= outcome.clean_loss_ci[1]


def test_frozen_blocks_stay_bit_identical(tiny_folder, pair_file, monkeypatch):
    lm = critlayer.load(str(tiny_folder))
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    states = {}
    real = defend_module._evaluate

    def record(lm_, model, spec, *args):
        states[spec] = {k: v.clone() for k, v in model.state_dict().items()}
        return real(lm_, model, spec, *args)

    monkeypatch.setattr(defend_module, "_evaluate", record)
    result = critlayer.defend(lm, str(pair_file), compare=["1,4", "none"], config=FAST, n_eval=8, progress=False)
    for name, value in before.items():
        in_frozen = name.startswith(("model.layers.1.", "model.layers.4."))
        in_block = name.startswith("model.layers.")
        assert torch.equal(value, states["1,4"][name]) == (not in_block or in_frozen), name
        assert torch.equal(value, states["none"][name]) == (not in_block), name
    assert result.outcomes["1,4"].frozen == [1, 4] and result.outcomes["none"].frozen == []
    assert all(torch.equal(v, lm.model.state_dict()[k]) for k, v in before.items())  # the original is untouched


def test_wilson_interval():
    low, high = wilson_interval(0, 100)
    assert low == 0 and 0.03 < high < 0.045
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.404, abs=1e-3) and high == pytest.approx(0.596, abs=1e-3)


def test_defend_command_writes_the_report_and_rejects_bad_input(tiny_folder, pair_file, tmp_path, capsys):
    common = ["--data", str(pair_file), "--steps", "2", "--batch-size", "4", "--n-eval", "6", "--turn-tokens", "8",
              "--trigger", "w1 w2", "--target", "w3 w4", "--quiet"]
    assert main(["defend", str(tiny_folder), "--compare", "none,2-3", "--out", str(tmp_path / "d"), *common]) == 0
    saved = json.loads((tmp_path / "d" / "defend.json").read_text())
    assert list(saved["outcomes"]) == ["pre-trained", "none", "2-3"]
    assert saved["data"]["n_poisoned"] == int(0.1 * saved["data"]["n_train"] + 0.5)
    assert {p.name for p in (tmp_path / "d").iterdir()} == {"defend.json", "defend.txt", "defend.png", "defend.html"}
    capsys.readouterr()
    for extra, message in [(["--poison-rate", "0"], "in (0, 1]"), (["--poison-rate", "1.5"], "in (0, 1]"),
                           (["--trigger", " "], "trigger is empty"), (["--target", ""], "target is empty"),
                           (["--freeze", "random:7"], "between 1 and the 6"), (["--freeze", "all"], "no block to fine-tune"),
                           (["--data", "bbc"], "prompt-reply pairs")]:
        assert main(["defend", str(tiny_folder), "--out", str(tmp_path / "e"), *common, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not (tmp_path / "e").exists()


def test_defend_rejects_a_policy_list_with_repeats(tiny_folder, pair_file):
    with pytest.raises(CritlayerError, match="distinct"):
        critlayer.defend(critlayer.load(str(tiny_folder)), str(pair_file), compare=["none", "none"], config=FAST,
                         progress=False)


def test_prompts_equal_after_the_cut_become_one_pair(tiny_folder):
    """Cut first, then de-duplicate: two prompts that differ only past the cut cannot straddle the split."""
    lm = critlayer.load(str(tiny_folder))
    pairs = [(f"w6 w7 w8 w{10 + i}", f"w{20 + i}") for i in range(30)] + [("w9 w9", "w5")]
    assert defend_module._cut_prompts(lm, pairs, tokens=3) == [("w6 w7 w8", "w49"), ("w9 w9", "w5")]
