"""Running the decoder blocks: hooks that watch them, the attention mask they get, and stopping after the last.

Every path that runs a model's blocks goes through here: the scan's capture (whole or block by block),
ablation, validation and the benchmark. The hooks see the residual stream after each block, before the
final norm; with ``stop`` the last block's hook ends the forward, so the final norm and the LM head
never run and no logits are computed. Without it the same hooks can watch ``generate()``. The model is
in eval mode while hooked and goes back to the mode it was in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch

from .language_model import LanguageModel


class StopForward(Exception):
    """Raised after the last block: nothing after it is needed."""


def attention_mask(lm: LanguageModel, mask: torch.Tensor) -> torch.Tensor | None:
    """The attention mask a right-padded batch needs: none where every attention is causal (a pad comes after
    every real token, so no real token's state changes, and attention takes its causal kernel), else ``mask``."""
    return None if lm.attends_causally else mask


def hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a block is called with."""
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def evaluating(lm: LanguageModel, handles: list = ()) -> Iterator[None]:
    """The model in eval mode, then back in the mode it was in; ``handles`` (hooks) removed on the way out."""
    was_training = lm.model.training
    lm.model.eval()
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        lm.model.train(was_training)


@contextmanager
def watching(lm: LanguageModel, on_hidden: Callable[[torch.Tensor], None] | None = None, *,
             stop: bool = True) -> Iterator[None]:
    """Hand ``on_hidden`` the input of block 0 and then every block's output, ``L + 1`` tensors per forward.

    With ``stop`` the forward ends after the last block (run it with ``forward_blocks``).
    """
    last = len(lm.blocks) - 1

    def after(index: int):
        def hook(module, args, output):
            if on_hidden is not None:
                on_hidden(output)
            if stop and index == last:
                raise StopForward
        return hook

    handles = [block.register_forward_hook(after(i)) for i, block in enumerate(lm.blocks)]
    if on_hidden is not None:
        handles.append(lm.blocks[0].register_forward_pre_hook(
            lambda module, args, kwargs: on_hidden(hidden_of(args, kwargs)), with_kwargs=True))
    with evaluating(lm, handles):
        yield


@contextmanager
def recording_calls(lm: LanguageModel, calls: list) -> Iterator[None]:
    """Append ``(hidden states, args, kwargs)`` of every block's call to ``calls``, stopping at the last block's
    (before it runs): what block-by-block execution replays."""
    last = len(lm.blocks) - 1

    def before(index: int):
        def hook(module, args, kwargs):
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            calls.append((hidden_of(args, kwargs), args[1:], rest))
            if index == last:
                raise StopForward
        return hook

    handles = [block.register_forward_pre_hook(before(i), with_kwargs=True) for i, block in enumerate(lm.blocks)]
    with evaluating(lm, handles):
        yield


def forward_blocks(lm: LanguageModel, input_ids: torch.Tensor, mask: torch.Tensor) -> None:
    """One forward of a right-padded batch, with the mask ``attention_mask`` decides, until a hook stops it."""
    try:
        lm.model(input_ids=input_ids, attention_mask=attention_mask(lm, mask), use_cache=False)
    except StopForward:
        pass


def computing_in(model: torch.nn.Module, dtype: torch.dtype):
    """A context computing in ``dtype``: autocast where the weights are wider (mixed precision), else nothing."""
    device = next(model.parameters()).device
    wider = next(model.parameters()).dtype.itemsize > dtype.itemsize
    return torch.autocast(device.type, dtype=dtype) if wider else nullcontext()
