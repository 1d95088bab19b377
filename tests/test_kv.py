"""critlayer kv: the cache (transformers' layers, quanto's quantizer), the evaluation that reads it, and the plan."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from conftest import tiny_config, tiny_tokenizer

import critlayer
from critlayer import CritlayerError, LanguageModel
from critlayer.cli import main
from critlayer.use.continuation import Reading, _continuation, evaluate_caches, prompt_states
from critlayer.use.kvcache import (Pair, attention_layers, build_cache, cache_bytes, cache_keyword, parse_pair,
                                   parse_pairs)

SMALL = {"n_eval": 2, "calibration": 2, "max_tokens": 64, "group": 16, "residual": 8, "chunk": 8, "draws": 2,
         "progress": False}  # pairs at 16 tokens per group: KV2 4 bits, K4V2 5, KV4 6


def _lm(arch: str = "llama") -> LanguageModel:
    """A tiny model whose attention matters: weights drawn wider than a fresh model's, so that what the cache holds
    moves the next-token distribution."""
    torch.manual_seed(0)
    config = tiny_config(arch)
    config.initializer_range = 0.3
    config.head_dim = 16  # the config made it from its default width, before tiny_config narrowed the model
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    return LanguageModel.wrap(model, tiny_tokenizer(), name=f"tiny-{arch}")


def _documents(n: int = 3, length: int = 48) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return [[1, *torch.randint(4, 64, (length - 1,), generator=generator).tolist()] for _ in range(n)]


def _scores(lm, plan, reading, documents=None):
    reference, scores, nbytes = evaluate_caches(lm, documents or _documents(), {"plan": plan}, reading,
                                                progress=False)
    return reference, scores["plan"], nbytes


def test_pairs_are_read_from_their_names_and_bad_ones_refused_in_one_line():
    assert parse_pair("kv4") == Pair(4, 4) and parse_pair("K8V2").name == "K8V2"
    assert [p.name for p in parse_pairs(None)] == ["KV2", "K4V2", "KV4", "K8V4", "KV8", "KV16"]
    assert Pair(4, 2).bits(64) == 3.5 and Pair(16, 16).bits(64) == 16 and Pair(8, 8).bits(64) == 8.25
    for bad, message in (("K3V2", "not 3"), ("Q4_0", "unknown KV width"), ("KV4", "at least two")):
        with pytest.raises(CritlayerError, match=message):
            parse_pairs(bad)


def test_a_quantized_cache_changes_the_scored_continuation_and_full_precision_does_not():
    lm = _lm()
    reading = Reading(prefill=16, chunk=8, group=8, residual=8)
    reference, keys2, _ = _scores(lm, [Pair(2, 16)] * 6, reading)
    assert keys2.kl.sum() > 1e-4 and not np.allclose(keys2.loss, reference.loss)  # 2-bit keys are read back
    _, full, _ = _scores(lm, [Pair(16, 16)] * 6, reading)
    np.testing.assert_array_equal(full.loss, reference.loss)
    _, unflushed, _ = _scores(lm, [Pair(2, 2)] * 6, Reading(prefill=16, chunk=8, group=8, residual=64))
    np.testing.assert_allclose(unflushed.loss, reference.loss, rtol=1e-6)  # nothing old enough to quantize


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_starting_from_the_prompts_states_is_running_the_prefill(arch):
    lm = _lm(arch)
    documents, plan = _documents(2), [Pair(4, 2)] * 6
    reading = Reading(prefill=20, chunk=8, group=8, residual=8)
    _, seeded, _ = _scores(lm, plan, reading, documents)
    ids = torch.tensor(documents)
    cache = reading.cache(lm.model.config, plan)
    with torch.inference_mode():
        lm.model(input_ids=ids[:, :20], **{cache_keyword(lm.model): cache})
        chunks = list(_continuation(lm, ids, reading, cache))
    log_probs = torch.cat([lp for lp, _ in chunks], 1)
    loss = -log_probs.gather(-1, ids[:, 21:, None]).squeeze(-1).sum(1).double().numpy()
    np.testing.assert_allclose(seeded.loss, loss, rtol=1e-5)


def test_a_sliding_layer_reads_as_the_models_own_and_drops_what_left_its_window():
    lm = _lm("gemma3")
    windows = attention_layers(lm.model.config)
    assert any(windows) and not all(windows)
    window = next(w for w in windows if w)
    reading = Reading(prefill=16, chunk=4, group=4, residual=64)
    reference, _, _ = evaluate_caches(lm, _documents(), {}, reading, progress=False)
    _, unquantized, _ = _scores(lm, [Pair(2, 2)] * 6, reading)  # our sliding layer, nothing flushed yet
    np.testing.assert_allclose(unquantized.loss, reference.loss, rtol=1e-6)
    cache = build_cache(lm.model.config, [Pair(8, 8)] * 6, group=4, residual=0)
    with torch.inference_mode():
        lm.model(input_ids=torch.tensor(_documents(1)), **{cache_keyword(lm.model): cache})
    for layer, w in zip(cache.layers, windows):
        assert layer.get_seq_length() == 48
        assert layer.held() == 48 if w is None else window - 1 <= layer.held() < window - 1 + 4


def test_narrower_caches_hold_fewer_bytes():
    lm = _lm()
    lm.model.to(torch.bfloat16)  # the cache and its scales in 16 bits, as served
    reading = Reading(prefill=16, chunk=8, group=8, residual=8)
    plans = {p: [parse_pair(p)] * 6 for p in ("KV2", "KV4", "KV8")}
    _, _, nbytes = evaluate_caches(lm, _documents(), plans, reading, progress=False)
    assert nbytes["KV2"] < nbytes["KV4"] < nbytes["KV8"] < nbytes["full precision"]


def test_generate_with_the_plans_cache_gives_the_tokens_the_evaluation_reads():
    lm = _lm()
    plan = ["KV2", "K4V2", "KV4", "KV8", "KV16", "K8V4"]
    prompt = torch.tensor(_documents(1, 20))
    cache = critlayer.kv_cache(lm.model, plan, group=8, residual=8)
    with torch.inference_mode():
        generated = lm.model.generate(prompt, max_new_tokens=16, do_sample=False, min_new_tokens=16,
                                      **{cache_keyword(lm.model): cache})
    assert generated.shape[1] == 36
    reading = Reading(prefill=20, chunk=1, group=8, residual=8)
    again = reading.cache(lm.model.config, [parse_pair(p) for p in plan])
    with torch.inference_mode():
        for layer, (keys, values) in zip(again.layers, prompt_states(lm, generated[:, :20])):
            layer.update(keys, values)
        predicted = torch.cat([lp.argmax(-1) for lp, _ in _continuation(lm, generated, reading, again)], 1)
    assert torch.equal(predicted[0], generated[0, 21:])


def test_a_model_of_other_layers_and_a_gguf_check_are_refused_in_one_line():
    with pytest.raises(CritlayerError, match="writes none"):
        critlayer.KVConfig(llamacpp=True)
    config = SimpleNamespace(num_hidden_layers=2, layer_types=["full_attention", "linear_attention"],
                             model_type="hybrid")
    with pytest.raises(CritlayerError, match="linear_attention"):
        attention_layers(config)


def test_the_plan_meets_the_budget_beside_every_baseline_and_reloads_as_a_cache(prompt_file, tmp_path):
    folder = tmp_path / "model"
    lm = _lm()
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    scanned = critlayer.scan(str(folder), probes=str(prompt_file), n=16, max_tokens=10, progress=False)
    out = tmp_path / "kv"
    result = critlayer.kv(str(folder), bits=5.5, data=str(prompt_file), scan=scanned, out=out, **SMALL)
    assert result.bits_per_element <= 5.5 and len(result.plan) == 6
    assert {"uniform", "keys high", "first/last high", "reversed", "random", "consensus"} <= set(result.methods)
    for method in result.methods.values():
        for budget, cost in method.cost.items():
            assert cost["bits_per_element"] <= budget + 1e-9 and np.isfinite(method.perplexity[budget]).all()
    assert result.methods["uniform"].choices[5.5][0] == [0] * 6  # KV2: the widest uniform pair at 5.5 bits
    assert result.methods["keys high"].choices[5.5][0] == [1] * 6  # K4V2
    kl = np.array(result.sensitivity["kl"])
    assert kl.shape == (6, 2, 3) and (kl[:, :, 0] > kl[:, :, 2]).all()  # 2 bits move it more than 8
    assert {"kv_damage", "key_damage", "value_damage"} <= set(result.correlations)
    assert {p.name for p in result.pairs()} <= set(result.settings["widths"])
    assert {"kv.json", "kv.html", "kv.png"} <= {p.name for p in out.iterdir()}
    again = critlayer.KVResult.load(out)
    assert again.plan == result.plan and again.table() == result.table()
    cache = critlayer.kv_cache(critlayer.load(str(folder)), out)
    assert [getattr(layer, "pair", Pair(16, 16)) for layer in cache.layers] == result.pairs()
    assert json.loads((out / "kv.json").read_text())["plan"] == result.plan


@pytest.mark.parametrize("argv, message", [
    (["--bits", "2"], "outside the widths"),
    (["--widths", "KV4"], "choose between"),
    (["--bits", "20"], "outside the widths"),
    (["--widths", "K3V2,KV4"], "not 3"),
    (["--max-tokens", "4096"], "longer than"),
    (["--max-tokens", "48", "--prefill", "47"], "no continuation"),
])
def test_bad_input_is_one_line_and_nothing_on_disk(argv, message, tiny_folder, prompt_file, tmp_path, capsys):
    out = tmp_path / "kv"
    assert main(["kv", str(tiny_folder), "--data", str(prompt_file), "--out", str(out), "--quiet", *argv]) != 0
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not out.exists()


def test_cache_bytes_count_packed_data_and_scales():
    lm = _lm()
    lm.model.to(torch.bfloat16)
    cache = build_cache(lm.model.config, [Pair(4, 4)] * 6, group=8, residual=0)
    with torch.inference_mode():
        lm.model(input_ids=torch.tensor(_documents(1, 32)), **{cache_keyword(lm.model): cache})
    elements = 6 * 2 * 32 * lm.model.config.num_key_value_heads * 16
    assert cache_bytes(cache) == pytest.approx(elements * Pair(4, 4).bits(8) / 8, rel=0.01)


def test_a_second_source_evaluates_every_methods_plan_again(prompt_file, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("\n".join(" ".join(f"w{(i * 7 + j * 3) % 60}" for j in range(13)) for i in range(60)))
    lm = _lm()
    result = critlayer.kv(lm, bits=5.5, data=str(prompt_file), also_data=str(other), score="delta",
                          scan=critlayer.scan(lm, probes=str(prompt_file), n=16, max_tokens=10, progress=False),
                          **SMALL)
    also = result.settings["also_heldout"]
    assert also["source"] == str(other) and set(also["methods"]) == set(result.methods)
    assert any(name == "uniform" for name, *_ in result.elsewhere_rows(3)) and "other.txt" in result.table()
