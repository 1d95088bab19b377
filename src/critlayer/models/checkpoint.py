"""A pruned model as an ordinary checkpoint: safetensors, config and tokenizer that plain transformers reloads.

Deleting blocks goes through ``surgery.delete_blocks`` (per-layer indices and config entries repaired).
A dropped attention or MLP sublayer has no place in a plain config, so it is written the one way a
plain reload can express it: its output projection zeroed, which passes the residual stream through
exactly where the sublayer's output is added straight to it (pre-norm blocks). Where it is not (a
post-norm block, as in BERT), the zeroed model would compute something else, and saving is refused.
Either way a zeroed sublayer still computes: it saves no time.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from ..common.errors import CritlayerError
from .blocks import find_blocks
from .language_model import LanguageModel, linear_types
from .surgery import delete_blocks, dropped, sublayer


def sharing_copy(model: nn.Module, own: Iterable[torch.Tensor] = ()) -> nn.Module:
    """A copy of ``model``'s modules and config that shares the storage of every parameter and buffer with it but
    ``own`` (copied): a pruned model costs no second copy of the weights. Its parameters are objects of its own, so
    moving or casting one model leaves the other as it was; a shared tensor changed in place changes in both."""
    copied = {id(t) for t in own}
    memo = {id(p): nn.Parameter(p.data, requires_grad=p.requires_grad)
            for p in model.parameters() if id(p) not in copied}
    memo |= {id(b): b for b in model.buffers() if id(b) not in copied}  # a module's .to() rebinds its buffers
    return copy.deepcopy(model, memo)


def without_blocks(model: nn.Module, removed: list[int]) -> tuple[nn.Module, list[int]]:
    """A copy of ``model`` with the given blocks deleted (the kept ones sharing its tensors), and the original
    indices of the blocks kept."""
    pruned = sharing_copy(model)
    return pruned, delete_blocks(pruned, removed)


def output_projection(block: nn.Module, part: str) -> nn.Module:
    """The last linear layer of a block's attention or MLP: the one whose output the sublayer returns."""
    linears = [m for m in sublayer(block, part).modules() if isinstance(m, linear_types())]
    if not linears:
        raise CritlayerError(f"the {part} sublayer of {type(block).__name__} has no linear layer to zero")
    return linears[-1]


def without_sublayers(lm: LanguageModel, removed: list[int], part: str, probe: list[int]) -> nn.Module:
    """A copy of ``lm.model`` whose blocks ``removed`` have ``part``'s output projection (and bias) zeroed (every other
    tensor shared), checked on the token ids ``probe`` to compute what dropping the sublayer computes; refused where it
    does not."""
    zeroed = sharing_copy(lm.model, [p for i in removed for p in output_projection(lm.blocks[i], part).parameters()])
    blocks = find_blocks(zeroed)[1]
    with torch.no_grad():
        for i in removed:
            for param in output_projection(blocks[i], part).parameters():
                param.zero_()
    ids = torch.tensor([probe], device=lm.device)
    with torch.inference_mode():
        with dropped(lm.blocks, removed, part):
            expected = _logits(lm.model, ids)
        got = _logits(zeroed, ids)
    if not torch.allclose(got, expected, atol=1e-5 * max(1.0, float(expected.abs().max())), rtol=0):
        raise CritlayerError(f"a plain checkpoint of {lm.architecture} cannot express a dropped {part} sublayer: "
                             "zeroing its output projection does not pass the residual stream through (post-norm "
                             "blocks); evaluate the drop without --out, or prune whole blocks")
    return zeroed


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = model(input_ids=ids, use_cache=False)
    model.train(was_training)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).float()


def save_checkpoint(model: nn.Module, tokenizer, folder) -> None:
    """Weights as safetensors (tied ones stored once), config and tokenizer, into an existing (staged) folder."""
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
