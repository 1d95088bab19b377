"""Block surgery on every architecture: skipping equals deleting, deleted models reload and generate, sublayer drops,
weight swaps undo themselves."""

import copy

import pytest
import torch
import transformers

from critlayer import CritlayerError
from critlayer.models import find_blocks, surgery

from conftest import TINY, tiny_config, tiny_model

IDS = torch.tensor([[1] + list(range(4, 19)), [1] + list(range(30, 45))])  # 16 tokens: past gemma3's window of 8


def _logits(model, ids=IDS):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("arch", sorted(TINY))
def test_deleted_blocks_equal_skipped_ones_and_reload_with_plain_transformers(arch, tmp_path):
    model = tiny_model(arch)
    removed = [1, 3]
    with surgery.skipped(find_blocks(model)[1], removed):
        skipped = _logits(model)
    pruned = copy.deepcopy(model)
    kept = surgery.delete_blocks(pruned, removed)
    assert kept == [0, 2, 4, 5] and len(find_blocks(pruned)[1]) == 4
    torch.testing.assert_close(_logits(pruned), skipped, atol=1e-5, rtol=1e-5)
    assert pruned.config.num_hidden_layers == 4
    for new, block in enumerate(find_blocks(pruned)[1]):
        indices = {m.layer_idx for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)}
        assert indices <= {new}
    pruned.save_pretrained(tmp_path)
    auto = transformers.AutoModel if arch == "bert" else transformers.AutoModelForCausalLM
    reloaded = auto.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 4
    torch.testing.assert_close(_logits(reloaded), skipped, atol=1e-5, rtol=1e-5)
    if arch != "bert":  # greedy decoding with the KV cache equals an argmax loop without one
        with torch.no_grad():
            cached = reloaded.generate(IDS[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
            ids = IDS[:1]
            for _ in range(6):
                ids = torch.cat([ids, reloaded(input_ids=ids, use_cache=False).logits[:, -1:].argmax(-1)], 1)
        assert torch.equal(cached, ids)


def test_gemma3_keeps_the_attention_type_of_every_kept_block(tmp_path):
    model = tiny_model("gemma3")
    types = list(model.config.layer_types)
    assert "full_attention" in types and "sliding_attention" in types
    kept = surgery.delete_blocks(model, [0, 2])
    assert model.config.layer_types == [types[i] for i in kept]
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.layer_types == [types[i] for i in kept]
    sliding = [types[i] == "sliding_attention" for i in kept]
    assert [b.self_attn.is_sliding for b in model.model.layers] == sliding  # moved with their blocks
    assert [b.self_attn.is_sliding for b in reloaded.model.layers] == sliding  # rebuilt from the config


def test_qwen2_window_rule_splits_the_kept_blocks_where_it_did():
    config = tiny_config("qwen2")  # tiny: the default Qwen2 config is a 2-billion-parameter model
    config.use_sliding_window, config.sliding_window, config.max_window_layers = True, 8, 3
    config.layer_types = None
    model = transformers.AutoModelForCausalLM.from_config(type(config)(**config.to_dict()))
    types = list(model.config.layer_types)
    kept = surgery.delete_blocks(model, [1, 4])
    assert model.config.max_window_layers == 2 and model.config.layer_types == [types[i] for i in kept]


def test_dropping_a_prenorm_sublayer_equals_zeroing_its_output_projection():
    model = tiny_model("llama")
    blocks = find_blocks(model)[1]
    with surgery.dropped(blocks, [2], "attn"):
        dropped_attn = _logits(model)
    with surgery.dropped(blocks, [2], "mlp"):
        dropped_mlp = _logits(model)
    full = _logits(model)
    for name, dropped in (("o_proj", dropped_attn), ("down_proj", dropped_mlp)):
        zeroed = copy.deepcopy(model)
        with torch.no_grad():
            getattr(zeroed.model.layers[2], "self_attn" if name == "o_proj" else "mlp").get_submodule(name).weight.zero_()
        torch.testing.assert_close(_logits(zeroed), dropped, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(dropped, full, atol=1e-4)
    torch.testing.assert_close(_logits(model), full)  # the hooks are gone


def test_swapped_weights_come_back():
    model, other = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    blocks, source = find_blocks(model)[1], find_blocks(other)[1]
    own = {k: v.clone() for k, v in model.state_dict().items()}
    with surgery.swapped(blocks, source, [1, 2]):
        assert torch.equal(blocks[1].self_attn.q_proj.weight, source[1].self_attn.q_proj.weight)
        assert torch.equal(blocks[0].self_attn.q_proj.weight, own["model.layers.0.self_attn.q_proj.weight"])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in own.items())


def test_deleting_nothing_everything_or_unknown_blocks_is_refused():
    model = tiny_model("llama")
    for indices, message in (([], "must lie in"), ([6], "must lie in"), (range(6), "every block")):
        with pytest.raises(CritlayerError, match=message):
            surgery.delete_blocks(model, indices)
    assert len(find_blocks(model)[1]) == 6


def test_swapped_weights_are_what_a_model_computes_with_inside_one_autocast():
    """Autocast caches a lower-precision copy of each weight the first time it is used; a swap copies other weights
    into the same tensors, so without clearing that cache the swapped blocks would compute with the old weights
    (validate sets windows of tuned blocks back this way, all inside one autocast)."""
    base, tuned = tiny_model("llama"), tiny_model("llama")
    torch.manual_seed(0)
    for parameter in tuned.parameters():
        parameter.data += 0.5 * torch.randn_like(parameter)  # trainable leaves, as after fine-tuning
    ids = torch.randint(3, 50, (2, 12))
    blocks, source = find_blocks(tuned)[1], find_blocks(base)[1]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        tuned(input_ids=ids)  # fills the cache with the tuned weights' casts
        with surgery.swapped(blocks, source, range(len(blocks))):
            inside = tuned(input_ids=ids).logits.float()
        after = tuned(input_ids=ids).logits.float()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with surgery.swapped(blocks, source, range(len(blocks))):
            fresh = tuned(input_ids=ids).logits.float()
        own = tuned(input_ids=ids).logits.float()
    assert torch.equal(inside, fresh) and torch.equal(after, own)
