"""Quantization: plans meet their budget and follow their rule, the knapsack is optimal, the quantizers give what their
formats store, every architecture gets a plan and an evaluation, the exports say what the plan says (llama.cpp's
tensor types, a requantised GGUF, torchao's per-module configuration), and bad input is one line with nothing on
disk."""

import itertools
import json
import re

import numpy as np
import pytest
import torch

import critlayer
from critlayer import CritlayerError, LanguageModel
from critlayer.cli import main
from critlayer.models.gguf import gguf_tensor_name, read_back, write_requantized_gguf
from critlayer.use.bitplan import cheapest_plan, llama_cpp_order, plan_bits, ranked_plan, uniform_width
from critlayer.use.quantize import QuantizeResult
from critlayer.use.quantizers import parse_widths, width
from critlayer.use.weights import BlockWeights

from conftest import TINY, prompt_lines, tiny_model, tiny_tokenizer

SMALL = {"n_eval": 4, "calibration": 4, "draws": 2, "max_tokens": 12, "progress": False}


def _scan(lm, prompt_file):
    return critlayer.scan(lm, probes=str(prompt_file), n=16, max_tokens=12, progress=False)


def _costs(bits: list[float], n: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    return np.array([[int(b * size) for b in bits]] * n, dtype=np.int64), np.full(n, size)


def test_ranked_plan_moves_a_third_up_and_pays_for_it_from_the_end_of_the_order():
    costs, sizes = _costs([2.25, 3.25, 4.25], 9)  # equal steps: as many down as up
    order = [4, 0, 8, 1, 7, 2, 6, 3, 5]
    plan = ranked_plan(order, costs, sizes, int(costs[:, 1].sum()))
    assert [plan[i] for i in order] == [2, 2, 2, 1, 1, 1, 0, 0, 0]
    assert plan_bits(costs, plan) == costs[:, 1].sum()
    costs, sizes = _costs([4.25, 4.5, 5.0], 9)  # a step up costs two steps down: everyone else goes down
    plan = ranked_plan(order, costs, sizes, int(costs[:, 1].sum()))
    assert [plan[i] for i in order] == [2, 2, 2, 0, 0, 0, 0, 0, 0] and plan_bits(costs, plan) <= costs[:, 1].sum()
    assert ranked_plan(order, costs, sizes, int(costs[:, 0].sum())) == [0] * 9  # nothing to pay with


def test_cheapest_plan_is_the_best_of_every_plan_within_the_budget():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n, k = 5, 3
        costs = np.sort(rng.integers(10, 60, size=(n, k)), axis=1)
        damage = np.sort(rng.random((n, k)), axis=1)[:, ::-1]
        budget = int(rng.integers(costs[:, 0].sum(), costs[:, -1].sum() + 1))
        plan = cheapest_plan(damage, costs, budget)
        best = min(sum(damage[i, p] for i, p in enumerate(c)) for c in itertools.product(range(k), repeat=n)
                   if plan_bits(costs, list(c)) <= budget)
        assert plan_bits(costs, plan) <= budget
        assert sum(damage[i, p] for i, p in enumerate(plan)) == pytest.approx(best), trial


def test_llama_cpp_rule_gives_the_first_and_last_eighth_and_every_third_block_more_bits():
    order, share = llama_cpp_order(30)
    assert sorted(order[:14]) == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29] and share == 14 / 30
    assert order[-1] in (14, 15)  # the middle goes down first


def test_widths_store_what_their_format_says():
    assert float(width("Q4_0").bits) == 4.5 and float(width("MXFP4").bits) == 4.25
    assert float(width("int3").bits) == 3 + (16 + 3) / 64 and float(width("int3g128").bits) == 3 + (16 + 3) / 128
    assert len(torch.unique(width("int3g128").roundtrip(torch.randn(1, 128)))) <= 8
    torch.manual_seed(0)
    weight = torch.randn(8, 128)
    errors = []
    for name in ("int2", "int3", "int4", "int8"):
        values = width(name).roundtrip(weight)
        groups = values.reshape(8, 2, 64)
        assert max(len(torch.unique(g)) for g in groups.reshape(-1, 64)) <= 2 ** int(name[3:])
        errors.append(float((values - weight).pow(2).mean()))
    assert errors == sorted(errors, reverse=True)
    import gguf

    rows = weight.numpy()
    assert np.array_equal(width("Q5_1").roundtrip(weight).numpy(), gguf.quants.dequantize(
        gguf.quants.quantize(rows, gguf.GGMLQuantizationType.Q5_1), gguf.GGMLQuantizationType.Q5_1))
    with pytest.raises(CritlayerError, match="not a int format"):
        parse_widths("Q4_0,int3", "int")
    with pytest.raises(CritlayerError, match="unknown width"):
        parse_widths("Q3_X,Q4_0", "gguf")


@pytest.mark.parametrize("arch", [a for a in TINY if a != "bert"])
def test_every_architecture_gets_a_plan_and_an_evaluation(arch, prompt_file):
    lm = LanguageModel.wrap(tiny_model(arch), tiny_tokenizer(), name=f"tiny-{arch}")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    result = critlayer.quantize(lm, bits=5.5, widths="Q4_0,Q5_0,Q8_0", scan=_scan(lm, prompt_file), curve=False,
                                data=str(prompt_file), **SMALL)
    assert result.bits_per_weight <= 5.5 and len(result.plan) == 6 and set(result.plan.values()) <= {"Q4_0", "Q5_0", "Q8_0"}
    assert {"uniform", "reversed", "random", "llama.cpp rule"} <= set(result.methods)
    for method in result.methods.values():
        assert all(np.isfinite(method.perplexity[5.5])) and method.cost[5.5]["bits_per_weight"] <= 5.5
    assert result.reference["kl"] == 0
    kl = np.array(result.sensitivity["kl"])
    assert kl.shape == np.array(result.sensitivity["loss_rise"]).shape == (6, 3) and (kl > 0).all()
    assert (kl[:, 2] < kl[:, 0]).all()  # Q8_0 moves the distribution less than Q4_0
    assert "quantization_damage" in result.correlations
    assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())  # the loaded weights came back


def test_an_encoder_gets_a_plan_by_a_scan_score(prompt_file):
    lm = LanguageModel.wrap(tiny_model("bert"), tiny_tokenizer(), name="tiny-bert")
    scanned = _scan(lm, prompt_file)
    result = critlayer.quantize(lm, bits=4.5, score="delta", scan=scanned, data=str(prompt_file), **SMALL)
    assert result.bits_per_weight <= 4.5 and not result.reference and "no LM head" in result.settings["evaluation"]
    with pytest.raises(CritlayerError, match="no LM head"):
        critlayer.quantize(lm, bits=4.5, scan=scanned, data=str(prompt_file), **SMALL)


def test_tensor_types_file_names_every_block_tensor_once_at_the_plans_bits(tiny_folder, prompt_file, tmp_path):
    out = tmp_path / "q"
    result = critlayer.quantize(str(tiny_folder), bits=4.5, data=str(prompt_file), out=out, curve=False,
                                scan=_scan(str(tiny_folder), prompt_file), **SMALL)
    lm = critlayer.load(str(tiny_folder), dtype="float32")
    names = {gguf_tensor_name("llama", 6, f"model.layers.{i}.{n}"): m.weight.shape
             for i, block in enumerate(lm.blocks) for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    lines = (out / "llama-quantize-tensor-types.txt").read_text().split()
    bits = 0
    for line in lines:
        pattern, kind = line.split("=")
        matched = [n for n in names if re.search(pattern, n)]
        assert len(matched) == 1 and pattern.startswith("^") and pattern.endswith("$"), line
        w = width(kind.upper())
        rows, columns = names[matched[0]]
        assert columns % w.group == 0  # llama.cpp applies the type without falling back
        bits += rows * columns // w.group * w.group_bits
    assert len(lines) == len(names) == 42
    assert bits / sum(r * c for r, c in names.values()) == pytest.approx(result.bits_per_weight)
    saved = json.loads((out / "quantize.json").read_text())
    assert saved["plan"] == result.plan and saved["bits_per_weight"] == result.bits_per_weight
    assert (out / "quantize.png").is_file() and (out / "quantize.html").is_file()


@pytest.mark.parametrize("names", [None, "int2-hqq,int3-hqq,int4,int6"])
def test_torchao_configuration_quantizes_a_fresh_model_to_the_evaluated_weights(names, tiny_folder, prompt_file,
                                                                                 tmp_path):
    from torchao.core.config import config_from_dict
    from torchao.quantization import quantize_

    out = tmp_path / "q"
    result = critlayer.quantize(str(tiny_folder), bits=3.5, family="int", widths=names, group_size=32,
                                data=str(prompt_file), out=out, curve=False, scan=_scan(str(tiny_folder), prompt_file),
                                **SMALL)
    config = config_from_dict(json.loads((out / "torchao_config.json").read_text()))
    model = critlayer.load(str(tiny_folder), dtype="float32").model
    quantize_(model, config, filter_fn=None)
    lm = critlayer.load(str(tiny_folder), dtype="float32")
    widths = parse_widths(names, "int", 32)
    weights = BlockWeights(lm, widths)
    index = {w.name: k for k, w in enumerate(widths)}
    for i, block in enumerate(model.model.layers):
        expected = weights.quantized(i, index[result.plan[str(i)]])
        linears = [m for m in block.modules() if isinstance(m, torch.nn.Linear)]
        assert all(torch.equal(m.weight.dequantize(), e) for m, e in zip(linears, expected))


def test_requantised_gguf_holds_the_plans_types_and_values(tmp_path):
    import gguf

    source, out = tmp_path / "source.gguf", tmp_path / "out.gguf"
    torch.manual_seed(0)
    tensors = {"token_embd.weight": torch.randn(16, 64), "blk.0.attn_q.weight": torch.randn(32, 64),
               "blk.1.attn_q.weight": torch.randn(32, 64)}
    writer = gguf.GGUFWriter(source, "llama")
    writer.add_block_count(2)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for name, t in tensors.items():
        writer.add_tensor(name, t.numpy())
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
    writer.close()
    held = write_requantized_gguf(source, out, {"blk.0.attn_q.weight": "Q4_0", "blk.1.attn_q.weight": "MXFP4"})
    assert held["block_bits_per_weight"] == (4.5 + 4.25) / 2  # and the float32 embedding: 1,024 of 5,120 weights
    assert held["bits_per_weight"] == (1024 * 32 + 2048 * (4.5 + 4.25)) / 5120
    with pytest.raises(CritlayerError, match="holds Q4_0 as blk.0.attn_q.weight, not the planned Q8_0"):
        read_back(out, {"token_embd.weight": "F32", "blk.0.attn_q.weight": "Q8_0", "blk.1.attn_q.weight": "MXFP4"})
    reader = gguf.GGUFReader(out)
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds == {"token_embd.weight": "F32", "blk.0.attn_q.weight": "Q4_0", "blk.1.attn_q.weight": "MXFP4"}
    for t in reader.tensors:
        expected = tensors[t.name] if t.name.startswith("token") else width(kinds[t.name]).roundtrip(tensors[t.name])
        assert np.array_equal(gguf.quants.dequantize(t.data, t.tensor_type), expected.numpy())
    assert reader.get_field(gguf.Keys.General.FILE_TYPE).contents() == gguf.LlamaFileType.MOSTLY_Q4_0
    assert [f.name for f in reader.fields.values()].count(gguf.Keys.General.ARCHITECTURE) == 1


@pytest.mark.parametrize("argv, message", [
    (["--family", "gguf", "--bits", "4"], "outside the widths"),
    (["--bits", "9"], "outside the widths"),
    (["--score", "nonsense"], "unknown score"),
    (["--family", "int", "--widths", "Q4_0,Q8_0"], "not a int format"),
    (["--family", "int", "--bits", "3.3"], "rows of 32"),
])
def test_bad_input_is_one_line_and_nothing_on_disk(argv, message, tiny_folder, prompt_file, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_folder), "--data", str(prompt_file), "--out", str(out), "--quiet", *argv]) != 0
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not out.exists()


def test_an_existing_folder_needs_force(tiny_folder, prompt_file, tmp_path, capsys):
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["quantize", str(tiny_folder), "--data", str(prompt_file), "--out", str(out), "--quiet"]) != 0
    assert "--force" in capsys.readouterr().err and [p.name for p in out.iterdir()] == ["keep.txt"]


def test_uniform_width_is_the_widest_that_fits():
    costs, _ = _costs([2.25, 3.25, 4.25], 4)
    assert uniform_width(costs, int(costs[:, 1].sum())) == 1
    assert uniform_width(costs, int(costs[:, 1].sum()) - 1) == 0
    with pytest.raises(CritlayerError, match="below the narrowest"):
        uniform_width(costs, int(costs[:, 0].sum()) - 1)


def test_quantized_weights_take_effect_under_autocast_and_leave_after(tiny_lm):
    weights = BlockWeights(tiny_lm, parse_widths("Q4_0,Q8_0", "gguf"))
    ids = torch.tensor([[1] + list(range(4, 30))])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # autocast caches cast weights
        before = tiny_lm.model(input_ids=ids).logits
        with weights.at(dict.fromkeys(range(6), 0)):
            during = tiny_lm.model(input_ids=ids).logits
        after = tiny_lm.model(input_ids=ids).logits
    assert not torch.equal(before, during) and torch.equal(before, after)


def test_per_kind_plans_give_attention_and_mlp_their_own_widths(tiny_folder, prompt_file, tmp_path):
    out = tmp_path / "q"
    result = critlayer.quantize(str(tiny_folder), bits=4.5, per_kind=True, data=str(prompt_file), out=out,
                                curve=False, scan=_scan(str(tiny_folder), prompt_file), **SMALL)
    assert list(result.plan) == [f"{i}.{kind}" for i in range(6) for kind in ("attn", "mlp")] and result.bits_per_weight <= 4.5
    types = dict(line.split("=") for line in (out / "llama-quantize-tensor-types.txt").read_text().split())
    for pattern, kind in types.items():
        block, tensor = re.match(r"\^blk\\\.(\d+)\\\.(\w+)\\\.weight\$", pattern).groups()
        assert kind == result.plan[f"{block}.{'attn' if tensor.startswith('attn') else 'mlp'}"].lower()
    assert set(result.correlations["quantization_damage"]["block_influence"]) >= {"all", "partial"}


def test_llama_cpp_types_name_their_importance_and_their_fallback():
    w = width("Q3_K-imatrix/MXFP4")
    assert (w.for_row(512).name, w.for_row(576).name, w.llama_type, w.for_row(576).llama_type) == (
        "Q3_K-imatrix", "MXFP4", "Q3_K", "MXFP4")
    assert w.needs_importance and w.needs_llamacpp and w.group == 256 and float(w.bits) == 3.4375
    assert not width("Q4_0").needs_llamacpp and width("Q4_0-imatrix").needs_llamacpp
    assert width("MXFP4/Q2_K").for_row(576).name == "MXFP4"  # the fallback is for rows the first cannot hold
    for bad, message in [("IQ2_XS", "only with an importance matrix: name it IQ2_XS-imatrix"),
                         ("Q4_0-hqq", "unknown width"), ("Q2_K/Q3_K/Q4_0", "one width of Q2_K's family"),
                         ("Q8_0-imatrix", "does not weight Q8_0 by an importance matrix"),
                         ("Q2_K/int3", "one width of Q2_K's family")]:
        with pytest.raises(CritlayerError, match=re.escape(message)):
            width(bad)


def _rows_of_64_and_256() -> LanguageModel:
    """A tiny Llama whose MLP down projection has rows of 256 and every other matrix rows of 64."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    torch.manual_seed(0)
    return LanguageModel.wrap(transformers.LlamaForCausalLM(config).eval(), tiny_tokenizer(), name="rows-64-and-256")


def test_a_width_with_a_fallback_is_counted_tensor_by_tensor_on_the_model():
    lm = _rows_of_64_and_256()
    weights = BlockWeights(lm, parse_widths("Q2_K/Q8_0,Q4_0", "gguf"))
    down, rest = 256 * 64, 2 * 64 * 64 + 2 * 32 * 64 + 2 * 256 * 64  # rows of 256 (down) and of 64 (the others)
    assert [w.name for w in weights.widths] == ["Q4_0", "Q2_K/Q8_0"]  # 2.625 bits by name, 7.5 on this model
    assert weights.width_bits(1) == pytest.approx((down * 2.625 + rest * 8.5) / (down + rest))
    assert weights.held_as(1) == {"Q8_0": 12, "Q2_K": 2} and weights.held_as(0) == {"Q4_0": 14}
    with pytest.raises(CritlayerError, match=r"rows of 64 weights; Q2_K stores groups of 256.*Q2_K/MXFP4"):
        BlockWeights(lm, parse_widths("Q2_K,Q4_0", "gguf"))
    # Q2_K/Q5_1 is narrower than Q5_0 over the model and in the MLP (its down projection at Q2_K), wider in attention
    with pytest.raises(CritlayerError, match="Q5_0 is narrower than Q2_K/Q5_1 in unit 0.attn"):
        BlockWeights(lm, parse_widths("Q5_0,Q2_K/Q5_1", "gguf"), per_kind=True)


def test_hqq_scales_are_an_int_width_of_the_same_size_with_less_error_at_two_bits():
    plain, hqq = width("int2"), width("int2-hqq")
    assert (hqq.family, hqq.group, hqq.group_bits, hqq.qparams) == ("int", 64, plain.group_bits, "hqq_scale_only")
    assert width("int3g32-hqq").group == 32 and width("int3g32-hqq").bits == width("int3g32").bits
    torch.manual_seed(0)
    weight = torch.randn(64, 256)
    error = {w.name: float((w.roundtrip(weight) - weight).norm() / weight.norm()) for w in (plain, hqq)}
    assert error["int2-hqq"] < 0.9 * error["int2"]
    with pytest.raises(CritlayerError, match="unknown width"):
        width("Q4_0-hqq")


def test_importance_weighted_groups_are_torchaos_storage_with_less_weighted_error():
    from critlayer.use.imatrix import weighted_groups

    torch.manual_seed(0)
    weight = torch.randn(32, 256) * 0.02
    weight[:, ::37] *= 6  # outlier inputs, as real layers have
    importance = torch.rand(256) ** 4 * 10 + 0.01
    imatrix = width("int2-imatrix")
    assert (imatrix.group_bits, imatrix.qparams, imatrix.integer_bits) == (width("int2").group_bits, "importance", 2)
    values = imatrix.roundtrip(weight, importance)
    for group in values.reshape(-1, 64):  # at most four levels on one grid of a bfloat16 step
        levels = group.unique()
        step = (levels[1:] - levels[:-1]).min()
        assert len(levels) <= 4 and torch.allclose((levels - levels[0]) / step, ((levels - levels[0]) / step).round(),
                                                   atol=1e-3)
        if len(levels) == 4:  # every integer used: the step is the scale, stored in bfloat16
            assert step == step.bfloat16().float()
    weighted = lambda v: float(((v - weight) ** 2 * importance).sum())  # noqa: E731
    assert weighted(values) < 0.8 * weighted(width("int2").roundtrip(weight))
    assert weighted(values) < weighted(weighted_groups(weight, torch.ones(256), 2, 64))
    with pytest.raises(CritlayerError, match="importance matrix"):
        imatrix.roundtrip(weight)


def test_importance_is_each_inputs_mean_square_over_real_tokens(tiny_lm):
    from critlayer.use.imatrix import input_importance

    sequences = [[5, 6, 7, 8, 9], [10, 11]]
    layer = tiny_lm.blocks[1].mlp.down_proj
    importance = input_importance(tiny_lm, sequences, [layer])[layer]
    inputs = []
    handle = layer.register_forward_pre_hook(lambda module, args: inputs.append(args[0][0].detach().float()))
    with torch.no_grad():
        for s in sequences:  # one text at a time: no padding to leave out
            tiny_lm.model(torch.tensor([s]))
    handle.remove()
    assert torch.allclose(importance, torch.cat(inputs).square().mean(0), rtol=1e-4, atol=1e-6)


def test_an_importance_weighted_plan_is_evaluated_and_not_exported_to_torchao(tiny_folder, prompt_file, tmp_path):
    out = tmp_path / "q"
    result = critlayer.quantize(str(tiny_folder), bits=3.5, family="int", widths="int2-imatrix,int4", group_size=32,
                                data=str(prompt_file), out=out, curve=False, baselines=False,
                                scan=_scan(str(tiny_folder), prompt_file), **SMALL)
    assert result.settings["importance"]["text"] == "calibration"
    assert set(result.plan.values()) == {"int2-imatrix", "int4"}
    assert "calibration data" in result.exports["torchao"]["why"] and not (out / "torchao_config.json").exists()


def test_a_second_held_out_source_evaluates_every_methods_plan_again(tiny_folder, prompt_file, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("\n".join(" ".join(reversed(line.split())) for line in prompt_lines(30)))
    out = tmp_path / "q"
    result = critlayer.quantize(str(tiny_folder), bits=4.5, data=str(prompt_file), also_data=str(other), out=out,
                                curve=False, scan=_scan(str(tiny_folder), prompt_file), **SMALL)
    also = QuantizeResult.load(out).settings["also_heldout"]
    assert also["source"] == str(other) and also["n_heldout"] == 4
    assert also["reference"]["perplexity"] != result.reference["perplexity"]
    assert list(also["methods"]) == list(result.methods) and len(also["methods"]["random"]) == 2
    assert "perplexity_ratio_to_chosen_95" in also["methods"]["uniform"][0]
    assert f"held-out perplexity on {other}" in result.table()
    assert f"On {other} too" in (out / "quantize.html").read_text()
    with pytest.raises(CritlayerError, match="is --data itself"):
        critlayer.quantize(str(tiny_folder), data=str(prompt_file), also_data=str(prompt_file))
