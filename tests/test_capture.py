"""Capture: padding changes no real token, sinks are dropped, logits are never computed, hooks are cleaned up."""

import numpy as np
import pytest
import torch

from critlayer import CritlayerError, LanguageModel
from critlayer.find.capture import SINK_RATIO, WIDTH_STEP, Capture, padded_batch
from critlayer.find.probes import Probes
from critlayer.models.running import attention_mask

from conftest import TINY, tiny_model


def _states(lm, token_ids, mode, **kw):
    capture = Capture(lm, Probes("test", token_ids), token_mode=mode, progress=False, sink_ratio=0, **kw)
    batches = list(capture)
    return torch.cat([b.states for b in batches], 1), torch.cat([b.keys for b in batches]), capture


@pytest.mark.parametrize("arch", sorted(TINY))
def test_padding_changes_no_real_token_in_any_architecture(arch):
    """Causal models run without a mask (a right pad comes after every real token); BERT needs it. Either way a
    sample's states are the same alone as beside a longer one (past gemma3's sliding window of 8)."""
    lm = LanguageModel.wrap(tiny_model(arch), name=arch)
    assert (attention_mask(lm, torch.ones(1, 1)) is None) == (arch != "bert")
    short, long = [1, 5, 6, 7, 8, 9, 10, 11, 12, 13], [1] + list(range(14, 30))
    for mode in ("last", "all", "mean"):
        alone, _, _ = _states(lm, [long, short], mode, batch_size=1)  # each probe in a batch of its own
        padded, _, _ = _states(lm, [long, short], mode, batch_size=2)  # the short one padded to the long one
        torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)


def test_batches_are_padded_to_width_steps_within_the_positions():
    ids, mask = padded_batch([[5] * 9, [6, 7]], "cpu")
    assert ids.shape == (2, 2 * WIDTH_STEP) and mask.sum(1).tolist() == [9, 2]
    assert ids[1, :2].tolist() == [6, 7] and not ids[1, 2:].any()
    assert padded_batch([[5] * 9], "cpu", positions=12)[0].shape == (1, 12)  # not past the model's positions
    assert padded_batch([[5] * WIDTH_STEP], "cpu")[0].shape == (1, WIDTH_STEP)


def test_all_mode_takes_every_real_token_but_position_zero(tiny_lm):
    states, _, capture = _states(tiny_lm, [[1, 5, 6, 7], [1, 8, 9]], "all", batch_size=2)
    assert states.shape[1] == 3 + 2
    assert capture.stats.tokens == 7


@pytest.mark.parametrize("factor, ratio, dropped", [(1000.0, SINK_RATIO, 4), (4.5, SINK_RATIO, 4), (4.5, 5.0, 0),
                                                    (1.0, SINK_RATIO, 0)],
                         ids=["massive", "4.5x by default", "4.5x under a 5x cut", "normal kept"])
def test_massive_activation_tokens_are_dropped(tiny_lm, factor, ratio, dropped):
    """From 3x the median norm: smollm2-135m's massive tokens sit at 4-11x, normal ones under 2.8x."""
    def inflate(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden[:, 3] *= factor  # token 3 of every sample

    handle = tiny_lm.blocks[2].register_forward_hook(inflate)
    try:
        probes = Probes("test", [[1, 5, 6, 7, 8, 9, 10 + i] for i in range(4)])
        capture = Capture(tiny_lm, probes, token_mode="all", progress=False, batch_size=4, sink_ratio=ratio)
        rows = sum(b.states.shape[1] for b in capture)
    finally:
        handle.remove()
    assert capture.stats.sinks_dropped == dropped
    assert rows == 4 * (7 - 1) - dropped


def test_forward_stops_before_the_head_and_restores_the_model(tiny_lm):
    tiny_lm.model.train()
    head = tiny_lm.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda *a: pytest.fail("the LM head ran"))
    norm = tiny_lm.model.model.norm
    handle2 = norm.register_forward_hook(lambda *a: pytest.fail("the final norm ran"))
    try:
        states, _, _ = _states(tiny_lm, [[1, 5, 6], [1, 7, 8]], "last")
    finally:
        handle.remove()
        handle2.remove()
    assert states.shape == (tiny_lm.num_layers + 1, 2, tiny_lm.hidden_size)
    assert tiny_lm.model.training
    tiny_lm.model.eval()
    hooks = [b._forward_hooks for b in tiny_lm.blocks] + [tiny_lm.blocks[0]._forward_pre_hooks]
    assert all(len(h) == 0 for h in hooks)


def test_states_are_the_residual_stream_before_the_final_norm(tiny_lm):
    ids = torch.tensor([[1, 5, 6, 7]])
    out = tiny_lm.model(input_ids=ids, output_hidden_states=True)
    states, _, _ = _states(tiny_lm, [[1, 5, 6, 7], [1, 8, 9, 10]], "last", batch_size=1)
    # hidden_states[l] is the input of block l; the last one has the final norm applied in Llama
    for layer in range(tiny_lm.num_layers):
        torch.testing.assert_close(states[layer, 0], out.hidden_states[layer][0, -1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(states[-1, 0], out.hidden_states[-1][0, -1], atol=1e-3)


def test_too_short_sequences_are_an_error(tiny_lm):
    with pytest.raises(CritlayerError, match="too short"):
        Capture(tiny_lm, Probes("test", [[1], [1], [1, 2]]), token_mode="all", progress=False)


def test_identical_probes_are_refused_on_their_token_ids(tiny_lm):
    same = [[1, 5, 6, 7]] * 5
    for mode in ("last", "all", "mean"):  # in all mode one probe's positions differ, but no probe from another
        with pytest.raises(CritlayerError, match="probes are identical"):
            Capture(tiny_lm, Probes("test", same), token_mode=mode, progress=False)
    Capture(tiny_lm, Probes("test", [*same, [1, 5, 6, 8]]), token_mode="last", progress=False)


def test_keys_do_not_depend_on_batching(tiny_lm):
    token_ids = [[1] + list(range(4, 4 + n)) for n in (3, 7, 5, 2)]
    _, keys1, _ = _states(tiny_lm, token_ids, "all", batch_size=1)
    _, keys4, _ = _states(tiny_lm, token_ids, "all", batch_size=4)
    np.testing.assert_array_equal(np.sort(keys1.numpy()), np.sort(keys4.numpy()))


def test_a_bfloat16_model_keeps_its_rows_in_bfloat16(tiny_lm):
    """Compared with block 2's output recorded in the same forward: bfloat16 kernels round differently by batch
    shape and CPU, so only the same forward's values can be asked for exactly."""
    tiny_lm.model.to(torch.bfloat16)
    seen = []
    handle = tiny_lm.blocks[2].register_forward_hook(lambda module, args, output: seen.append(output.clone()))
    try:
        states, _, _ = _states(tiny_lm, [[1, 5, 6, 7], [1, 8, 9]], "last", batch_size=2)
    finally:
        handle.remove()
    assert states.dtype == torch.bfloat16
    assert torch.equal(states[3, 0], seen[0][0, 3]) and torch.equal(states[3, 1], seen[0][1, 2])


def test_outputs_that_do_not_vary_are_refused_whatever_the_measures(tiny_lm):
    """Different token ids with one embedding give identical states: caught on the block outputs, to the model's
    rounding, even by a measure (influence) that would not fail on them by itself."""
    from critlayer import scan

    with torch.no_grad():
        embeddings = tiny_lm.model.get_input_embeddings().weight
        embeddings[5:] = embeddings[5]
    probes = Probes("test", [[1, 5 + i, 20 + i] for i in range(8)])
    for measures in ("influence", "default"):
        with pytest.raises(CritlayerError, match="output is the same for every probe"):
            scan(tiny_lm, probes=probes, measures=measures, token_mode="last", progress=False)
