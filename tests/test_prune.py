"""Pruning: the checkpoint reloads in a fresh process and computes what skipping computed, every method chooses from
the same eligible blocks, every architecture prunes and reloads, sublayer drops are written only where exact, a pruned
GGUF reads back, and bad input is one line with nothing on disk."""

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file

import critlayer
from critlayer import CritlayerError, LanguageModel
from critlayer.cli import main
from critlayer.models import find_blocks, surgery
from critlayer.find.select import eligible_blocks
from critlayer.use.removal import angular_run, random_blocks

from conftest import TINY, prompt_lines, tiny_model, tiny_tokenizer

SMALL = {"n_eval": 4, "calibration": 4, "draws": 2, "max_tokens": 12, "progress": False}
IDS = torch.tensor([[1] + list(range(4, 19))])  # 16 tokens: past the tiny gemma3's sliding window of 8

RELOAD = """
import sys, torch, transformers
from safetensors.torch import save_file
folder, ids = sys.argv[1], torch.tensor([[int(i) for i in sys.argv[2].split(",")]])
model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
with torch.no_grad():
    logits = model(input_ids=ids).logits
    cached = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    loop = ids
    for _ in range(6):
        loop = torch.cat([loop, model(input_ids=loop, use_cache=False).logits[:, -1:].argmax(-1)], 1)
save_file({"logits": logits.contiguous(), "cached": cached, "loop": loop}, sys.argv[3])
"""


def _folder(arch, path):
    model = tiny_model(arch)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return model


def _scan(folder, prompt_file, out):
    return critlayer.scan(str(folder), probes=str(prompt_file), n=16, max_tokens=12, progress=False, out=out)


def _skipped_logits(model, removed, ids=IDS):
    with torch.no_grad(), surgery.skipped(find_blocks(model)[1], removed):
        return model(input_ids=ids).logits


def test_pruned_checkpoint_reloads_in_a_fresh_process_and_equals_skipping(tiny_folder, prompt_file, tmp_path):
    scan_folder = tmp_path / "scan"
    _scan(tiny_folder, prompt_file, scan_folder)
    out = tmp_path / "pruned"
    result = critlayer.prune(str(tiny_folder), remove=2, data=str(prompt_file), scan=scan_folder, out=out, **SMALL)
    assert len(result.removed) == 2 and result.kept == [i for i in range(6) if i not in result.removed]
    ids = ",".join(map(str, IDS[0].tolist()))
    done = subprocess.run([sys.executable, "-c", RELOAD, str(out), ids, str(tmp_path / "out.safetensors")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    got = load_file(tmp_path / "out.safetensors")
    original = transformers.AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32).eval()
    assert (got["logits"] - _skipped_logits(original, result.removed)).abs().max() <= 1e-4
    assert torch.equal(got["cached"], got["loop"])
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 4

    saved = json.loads((out / "prune.json").read_text())
    eligible = saved["eligible"]
    assert eligible == [1, 2, 3, 4] and saved["count"] == 2 and saved["context_tokens"] == 12
    chosen = "block_influence, loss-checked among 2 with neighbours"  # a quarter of four eligible blocks, at least 2
    assert list(saved["methods"]) == [chosen, "sleb", "last", "random", "block_influence", "angular"]
    assert saved["methods"][chosen]["cost"]["2"]["forward_tokens"] > saved["methods"]["block_influence"]["cost"]["2"][
        "forward_tokens"]  # the scan's cost, and the checks' on top
    for name, method in saved["methods"].items():
        for n, choices in method["choices"].items():
            assert all(len(c) == int(n) and set(c) <= set(eligible) for c in choices), name
            assert len(method["perplexity"][n]) == len(choices)
    assert len(saved["methods"]["random"]["choices"]["2"]) == 2
    assert saved["methods"]["last"]["choices"]["2"] == [[3, 4]]
    assert saved["methods"]["sleb"]["cost"]["2"]["forward_tokens"] > saved["methods"]["sleb"]["cost"]["1"]["forward_tokens"]
    assert saved["methods"]["block_influence"]["cost"]["1"]["forward_tokens"] > 0  # the scan's cost is the score's
    assert "perplexity_ratio_to_chosen_95" in saved["methods"]["sleb"]["evaluation"]["2"][0]
    assert set(saved["correlations"]["pruning_damage"]) >= {"delta", "consensus", "depth"}
    assert saved["speed"]["parameters_pruned"] < saved["speed"]["parameters_unpruned"]
    assert (out / "prune.png").stat().st_size > 0 and (out / "prune.html").stat().st_size > 0
    assert saved["gguf"]["file"] is None  # a folder, not a GGUF source


def test_sleb_first_step_removes_the_block_whose_absence_costs_least(tiny_folder, prompt_file, tmp_path):
    _scan(tiny_folder, prompt_file, tmp_path / "scan")
    result = critlayer.prune(str(tiny_folder), remove=1, score="sleb", data=str(prompt_file), scan=tmp_path / "scan",
                             **SMALL)
    rise = np.array(result.settings["single_block_rise"]["values"])
    eligible = result.settings["eligible"]
    assert result.removed == [eligible[int(np.argmin(rise[eligible]))]]
    assert list(result.methods) == ["sleb", "last", "random", "block_influence", "angular"]


def test_methods_draw_from_the_eligible_blocks():
    assert eligible_blocks(8, 1) == [1, 2, 3, 4, 5, 6] and eligible_blocks(8, 0) == list(range(8))
    assert random_blocks([1, 2, 3, 4, 5], 3, 0) == random_blocks([1, 2, 3, 4, 5], 3, 0)
    distances = np.array([[0.5, 0.1, 0.3, 0.2, 0.4, np.nan], [0.6, 0.2, 0.1, 0.5, np.nan, np.nan]])
    assert angular_run(distances, [1, 2, 3, 4], 1) == [1]
    assert angular_run(distances, [1, 2, 3, 4], 2) == [2, 3]
    assert angular_run(distances, [0, 1, 2, 3, 4], 1) == [1]


def test_least_critical_keeps_to_the_eligible_blocks_when_a_firm_block_is_not_one():
    """A firm block outside the eligible ones (an edge, from a scan made with --edges) ranks first in the scan's
    order but must not take an eligible block's place among the least critical."""
    from critlayer.find.consensus import Consensus
    from critlayer.find.firmness import Firmness
    from critlayer.find.select import Selection

    delta = np.array([0.1, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.2])  # low delta = critical
    selection = Selection([0], "band", "delta", "", 2, True, list(range(8)))
    firmness = Firmness("delta", [1.0] + [0.0] * 7, 200, "", replication=[1.0] + [0.0] * 7)
    scan = critlayer.ScanResult({}, {}, list(range(8)), None, {"delta": delta}, selection,
                                Consensus({}, [], [], 0, [], None, {}), firmness)
    eligible = eligible_blocks(8, 1)
    assert scan.least_critical("delta", eligible) == [6, 5, 4, 3, 2, 1]


@pytest.mark.parametrize("arch", sorted(TINY))
def test_every_architecture_prunes_reloads_and_generates(arch, prompt_file, tmp_path):
    model = tiny_model(arch)
    lm = LanguageModel.wrap(copy.deepcopy(model), tiny_tokenizer(), name=f"tiny-{arch}")
    scanned = critlayer.scan(lm, probes=str(prompt_file), n=16, max_tokens=12, progress=False)
    out = tmp_path / "pruned"
    result = critlayer.prune(lm, remove=2, data=str(prompt_file), scan=scanned, baselines=False, out=out, **SMALL)
    auto = transformers.AutoModel if arch == "bert" else transformers.AutoModelForCausalLM
    reloaded = auto.from_pretrained(out, dtype=torch.float32).eval()
    assert reloaded.config.num_hidden_layers == 4 and len(find_blocks(reloaded)[1]) == 4
    if arch == "bert":
        with torch.no_grad(), surgery.skipped(find_blocks(model)[1], result.removed):
            expected = model(input_ids=IDS).last_hidden_state
            got = reloaded(input_ids=IDS).last_hidden_state
        assert (got - expected).abs().max() <= 1e-4
        return
    assert (reloaded(input_ids=IDS).logits.detach() - _skipped_logits(model, result.removed)).abs().max() <= 1e-4
    types = getattr(model.config, "layer_types", None)
    if types:
        assert reloaded.config.layer_types == [types[i] for i in result.kept]
    with torch.no_grad():
        cached = reloaded.generate(IDS, max_new_tokens=5, do_sample=False, pad_token_id=0)
        loop = IDS
        for _ in range(5):
            loop = torch.cat([loop, reloaded(input_ids=loop, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(cached, loop)


def test_sublayer_drops_are_written_only_where_a_zeroed_projection_is_exact(prompt_file, tmp_path):
    model = _folder("llama", tmp_path / "llama")
    _scan(tmp_path / "llama", prompt_file, tmp_path / "scan")
    result = critlayer.prune(str(tmp_path / "llama"), remove=2, parts="attn", data=str(prompt_file),
                             scan=tmp_path / "scan", out=tmp_path / "pruned", **SMALL)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert reloaded.config.num_hidden_layers == 6
    with torch.no_grad(), surgery.dropped(find_blocks(model)[1], result.removed, "attn"):
        expected = model(input_ids=IDS).logits
    assert (reloaded(input_ids=IDS).logits.detach() - expected).abs().max() <= 1e-5
    assert "angular" not in result.methods  # runs of whole blocks only
    _folder("gpt2", tmp_path / "gpt2")  # a projection with a bias: zeroing the bias too keeps the drop exact
    _scan(tmp_path / "gpt2", prompt_file, tmp_path / "scan2")
    critlayer.prune(str(tmp_path / "gpt2"), remove=1, parts="mlp", data=str(prompt_file), scan=tmp_path / "scan2",
                    baselines=False, out=tmp_path / "gpt2-pruned", **SMALL)


def test_pruned_gguf_reads_back_with_transformers(tmp_path):
    gguf = pytest.importorskip("gguf")
    source = tmp_path / "tiny.gguf"
    _tiny_llama_gguf(gguf, source)
    from critlayer.models.gguf import write_pruned_gguf

    held = write_pruned_gguf(source, tmp_path / "pruned.gguf", [0, 2, 3])
    assert held["block_bits_per_weight"] == 32.0 and held["read_back"].endswith("hold their planned types")
    reader = gguf.GGUFReader(tmp_path / "pruned.gguf")
    assert int(reader.get_field("llama.block_count").contents()) == 3
    names = {t.name for t in reader.tensors}
    assert "blk.2.attn_q.weight" in names and "blk.3.attn_q.weight" not in names
    original = {t.name: np.array(t.data) for t in gguf.GGUFReader(source).tensors}
    pruned = {t.name: np.array(t.data) for t in reader.tensors}
    np.testing.assert_array_equal(pruned["blk.1.ffn_down.weight"], original["blk.2.ffn_down.weight"])
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="pruned.gguf")
    assert model.config.num_hidden_layers == 3
    with pytest.raises(CritlayerError, match="full attention"):
        write_pruned_gguf(source, tmp_path / "moved.gguf", [1, 2, 3], ["sliding", "full", "sliding", "full"])
    assert not (tmp_path / "moved.gguf").exists()


def _tiny_llama_gguf(gguf, path):
    """A 4-block Llama GGUF with float32 tensors and a tiny BPE vocabulary (what transformers' loader needs)."""
    hidden, ffn, vocab, blocks = 32, 64, 16, 4
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(blocks)
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(hidden // 2)
    writer.add_tokenizer_model("gpt2")
    tokens = ["<s>", "</s>", *[chr(ord("a") + i) for i in range(vocab - 2)]]
    writer.add_token_list(tokens)
    writer.add_token_types([1] * vocab)
    writer.add_token_merges([])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    rng = np.random.default_rng(0)
    tensor = lambda *shape: rng.standard_normal(shape).astype(np.float32) * 0.05  # noqa: E731
    writer.add_tensor("token_embd.weight", tensor(vocab, hidden))
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    for b in range(blocks):
        for name, shape in (("attn_q", (hidden, hidden)), ("attn_k", (16, hidden)), ("attn_v", (16, hidden)),
                            ("attn_output", (hidden, hidden)), ("ffn_gate", (ffn, hidden)), ("ffn_up", (ffn, hidden)),
                            ("ffn_down", (hidden, ffn))):
            writer.add_tensor(f"blk.{b}.{name}.weight", tensor(*shape))
        for name in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{b}.{name}.weight", np.ones(hidden, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("critlayer: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_input_is_one_line_and_writes_nothing(tiny_folder, prompt_file, tmp_path, capsys):
    scan_folder = tmp_path / "scan"
    _scan(tiny_folder, prompt_file, scan_folder)
    out = tmp_path / "out"
    base = ["prune", str(tiny_folder), "--data", str(prompt_file), "--scan", str(scan_folder), "--out", str(out),
            "--quiet", "--n-eval", "4", "--calibration", "4", "--max-tokens", "12"]
    capsys.readouterr()
    assert "must be a positive number" in _error(capsys, [*base, "--remove", "0"])
    assert "eligible blocks" in _error(capsys, [*base, "--remove", "4"])
    assert "whole number" in _error(capsys, [*base, "--remove", "2.5"])
    assert "unknown score" in _error(capsys, [*base, "--score", "nope"])
    other = LanguageModel.wrap(tiny_model("qwen2"), tiny_tokenizer(), name="tiny-qwen2")
    with pytest.raises(CritlayerError, match="another model"):
        critlayer.prune(other, remove=1, data=str(prompt_file), scan=scan_folder, out=out, **SMALL)
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "--force" in _error(capsys, base)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    one_block = tmp_path / "one-block"
    tiny_model("llama", layers=1).save_pretrained(one_block)
    tiny_tokenizer().save_pretrained(one_block)
    assert "no stack of transformer blocks" in _error(capsys, ["prune", str(one_block), "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
    with pytest.raises(CritlayerError, match="positive"):
        critlayer.PruneConfig(remove=0)


@pytest.mark.parametrize("lora", [False, True])
def test_healing_fine_tunes_the_pruned_model_and_saves_it_merged(tiny_folder, prompt_file, tmp_path, lora):
    _scan(tiny_folder, prompt_file, tmp_path / "scan")
    out = tmp_path / "healed"
    result = critlayer.prune(str(tiny_folder), remove=2, data=str(prompt_file), scan=tmp_path / "scan",
                             baselines=False, heal=3, heal_lora=lora, out=out, **SMALL)
    healing = json.loads((out / "prune.json").read_text())["healing"]
    assert healing["steps"] == 3 and healing["lora"] is lora and len(healing["run"]["train_loss"]) == 3
    assert healing["before"]["perplexity"] != healing["after"]["perplexity"]
    weights = load_file(out / "model.safetensors")
    assert not any("lora" in name for name in weights)  # merged into plain weights
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    original = transformers.AutoModelForCausalLM.from_pretrained(tiny_folder).eval()
    with torch.no_grad():
        assert not torch.allclose(reloaded(input_ids=IDS).logits, _skipped_logits(original, result.removed))
    assert result.gguf["file"] is None


def test_loss_checked_removal_takes_the_cheapest_of_the_least_critical(tiny_lm, prompt_file):
    from critlayer.data.text import sample_texts
    from critlayer.use.removal import greedy

    texts = sample_texts(tiny_lm, str(prompt_file), 6, 12)
    ranking = [4, 2, 1, 3]
    assert greedy(tiny_lm, texts, [1, 2, 3, 4], 3, ranking=ranking, candidates=1, progress=False).order == [4, 2, 1]
    checked = greedy(tiny_lm, texts, [1, 2, 3, 4], 2, ranking=ranking, candidates=2, progress=False)
    sleb = greedy(tiny_lm, texts, [1, 2, 3, 4], 1, progress=False)
    assert checked.order[0] == min([4, 2], key=lambda b: (sleb.first_rise[b], b))
    assert checked.forward_tokens[0] == 3 * sum(map(len, texts))  # the unablated pass and two candidates


def test_candidates_take_turns_between_the_score_and_the_blocks_next_to_removed_ones():
    from critlayer.use.prune import PruneConfig
    from critlayer.use.removal import checked_candidates

    ranking = [8, 9, 14, 16, 2, 10, 4, 15, 13, 6]
    assert checked_candidates(ranking, [], 4, neighbours=True) == [8, 9, 14, 16]  # nothing removed: no neighbours
    assert checked_candidates(ranking, [7, 8, 9, 14], 4, neighbours=True) == [16, 10, 2, 15]
    assert checked_candidates(ranking, [7, 8, 9, 14], 4) == [16, 2, 10, 4]
    assert PruneConfig(candidates=0.25).checked(16) == 4 and PruneConfig(candidates=0.25).checked(2) == 2
    assert PruneConfig(candidates=3).checked(16) == 3
    with pytest.raises(CritlayerError, match="whole number or a fraction"):
        PruneConfig(candidates=2.5)


def test_a_pruned_model_shares_the_kept_weights_and_leaves_the_loaded_one_whole(tiny_lm):
    from critlayer.models.checkpoint import output_projection, without_blocks, without_sublayers

    loaded = {p.data_ptr() for p in tiny_lm.model.parameters()}
    pruned, kept = without_blocks(tiny_lm.model, [2, 3])
    assert kept == [0, 1, 4, 5] and len(find_blocks(pruned)[1]) == 4 and len(tiny_lm.blocks) == 6
    assert {p.data_ptr() for p in pruned.parameters()} <= loaded  # no second copy of any weight
    pruned.to(torch.bfloat16)  # casting or moving the pruned model leaves the loaded one as it was
    assert {p.dtype for p in tiny_lm.model.parameters()} == {torch.float32}
    zeroed = without_sublayers(tiny_lm, [1], "mlp", list(range(1, 12)))
    own = output_projection(find_blocks(zeroed)[1][1], "mlp").weight
    assert own.data_ptr() not in loaded and not own.any()
    assert output_projection(tiny_lm.blocks[1], "mlp").weight.any()  # the loaded model's is untouched
    assert len({p.data_ptr() for p in zeroed.parameters()} - loaded) == 1


def test_a_change_holds_a_bfloat16_checkpoint_in_bfloat16_only_where_it_computes_in_it(tmp_path, monkeypatch):
    from critlayer.models.loading import change_model

    tiny_model("llama").to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    tiny_model("llama").save_pretrained(tmp_path / "fp32")
    for folder in ("bf16", "fp32"):
        tiny_tokenizer().save_pretrained(tmp_path / folder)
    monkeypatch.setattr("critlayer.models.loading.computes_bfloat16", lambda device: True)
    assert change_model(str(tmp_path / "bf16"), "auto").dtype == torch.bfloat16
    assert change_model(str(tmp_path / "bf16"), "float32").dtype == torch.float32
    assert change_model(str(tmp_path / "fp32"), "auto").dtype == torch.float32


def test_a_second_held_out_source_evaluates_every_methods_blocks_again(tiny_folder, prompt_file, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("\n".join(" ".join(reversed(line.split())) for line in prompt_lines(30)))
    result = critlayer.prune(str(tiny_folder), remove=2, data=str(prompt_file), also_data=str(other),
                             scan=_scan(tiny_folder, prompt_file, tmp_path / "scan"), **SMALL)
    also = result.settings["also_heldout"]
    assert also["source"] == str(other) and list(also["methods"]) == list(result.methods)
    assert "perplexity_ratio_to_chosen_95" in also["methods"]["last"][0]
    assert f"held-out perplexity on {other}" in result.table()


def test_the_kept_blocks_are_a_mergekit_passthrough_that_rebuilds_the_checkpoint(tiny_folder, prompt_file, tmp_path):
    out = tmp_path / "p"
    result = critlayer.prune(str(tiny_folder), remove=2, score="delta", candidates=0, baselines=False,
                             data=str(prompt_file), n_eval=4, calibration=4, max_tokens=10, out=out, progress=False,
                             scan=critlayer.scan(str(tiny_folder), probes=str(prompt_file), n=16, max_tokens=10,
                                                 progress=False))
    config = yaml.safe_load((out / "mergekit.yml").read_text())
    ranges = [s["sources"][0]["layer_range"] for s in config["slices"]]
    assert config["merge_method"] == "passthrough" and [i for a, b in ranges for i in range(a, b)] == result.kept
    assert {s["sources"][0]["model"] for s in config["slices"]} == {str(tiny_folder)}
    assert critlayer.PruneResult.load(out).mergekit == result.mergekit
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    run_merge(MergeConfiguration.model_validate(config), str(tmp_path / "merged"),
              MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))
    ours, theirs = load_file(out / "model.safetensors"), load_file(tmp_path / "merged" / "model.safetensors")
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
