"""Block-by-block execution, for models larger than memory: one block's weights at a time.

The model is built on the meta device (no weights) and only the tensors outside its blocks (the
embeddings) are read from its safetensors files. A pass with every block skipped records what
each block is called with (hidden states, masks, position embeddings); then each block in turn
is read from disk, every probe batch runs through it, its outputs become the next block's
inputs, and its weights go back to the meta device.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..common.errors import CritlayerError
from ..common.memory import trim_heap
from .blocks import find_blocks
from .running import forward_blocks, recording_calls
from .surgery import skipped


class SafetensorsWeights:
    """Where each tensor of a model folder lives, and how to put a module's weights in or take them out."""

    def __init__(self, folder: Path, dtype: torch.dtype, device: torch.device, base_prefix: str = ""):
        from safetensors import safe_open

        self.dtype, self.device, self.where = dtype, device, {}
        self.base_prefix = f"{base_prefix}." if base_prefix else ""  # checkpoints may omit it (GPT-2's h.0...)
        files = sorted(Path(folder).glob("*.safetensors"))
        if not files:
            raise CritlayerError(f"block-by-block mode reads safetensors files; {folder} has none")
        for file in files:
            with safe_open(file, framework="pt") as f:
                self.where.update(dict.fromkeys(f.keys(), file))

    def fill(self, module: nn.Module, prefix: str, recurse: bool = True) -> None:
        """Read the parameters of ``module`` (named ``prefix`` + local name) from disk."""
        from accelerate.utils import set_module_tensor_to_device
        from safetensors import safe_open

        for name, _ in list(module.named_parameters(recurse=recurse)):
            key = self._key(prefix + name)
            with safe_open(self.where[key], framework="pt") as f:
                value = f.get_tensor(key).to(self.dtype)
            set_module_tensor_to_device(module, name, self.device, value=value)

    def _key(self, name: str) -> str:
        """The checkpoint's name for a parameter, with or without the base model's prefix."""
        for key in (name, name.removeprefix(self.base_prefix), self.base_prefix + name):
            if key in self.where:
                return key
        raise CritlayerError(f"cannot stream this checkpoint: no tensor {name} in its files")

    @staticmethod
    def release(module: nn.Module) -> None:
        from accelerate.utils import set_module_tensor_to_device

        for name, _ in list(module.named_parameters()):
            set_module_tensor_to_device(module, name, "meta")
        trim_heap()  # hand the block's memory back to the system before the next one is read

    @contextmanager
    def loaded(self, module: nn.Module, prefix: str):
        self.fill(module, prefix)
        try:
            yield module
        finally:
            self.release(module)


def build_skeleton(model_class, config, folder: Path, dtype: torch.dtype, device: str):
    """The model on the meta device, with every tensor outside the blocks read from ``folder``."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = model_class.from_config(config, dtype=dtype)
    blocks_path, _ = find_blocks(model)
    weights = SafetensorsWeights(folder, dtype, torch.device(device), model.base_model_prefix)
    head = next((name for name, m in model.named_modules() if m is model.get_output_embeddings()), None)
    skip = tuple(f"{p}." for p in (blocks_path, head) if p)  # blocks come later; the head never runs
    for module_name in dict.fromkeys(n.rpartition(".")[0] for n, _ in model.named_parameters() if not n.startswith(skip)):
        module = model.get_submodule(module_name)
        weights.fill(module, f"{module_name}." if module_name else "", recurse=False)
    return model.eval(), weights


def block_calls(lm, ids: torch.Tensor, mask: torch.Tensor) -> list:
    """(hidden states, args, kwargs) each block would receive, with every block skipped (their weights are not
    in memory): only block 0's hidden states are real; the masks and position embeddings are all real."""
    calls: list = []
    with skipped(lm.blocks, range(len(lm.blocks))), recording_calls(lm, calls):
        forward_blocks(lm, ids, mask)
    return calls


def stream_blocks(lm, batches: list, add: Callable[[torch.Tensor, int], None], progress: bool = True) -> None:
    """Hand ``add(hidden, batch)`` the input of block 0 and then the output of every block, per batch.

    ``batches`` are ``(ids, attention mask)`` pairs of right-padded probes; every batch goes through block ``i``
    before block ``i + 1`` is read, so at most one block's weights are in memory.
    """
    calls = [block_calls(lm, ids, mask) for ids, mask in batches]
    hidden = [c[0][0] for c in calls]
    for b, h in enumerate(hidden):
        add(h, b)
    for i, block in enumerate(tqdm(lm.blocks, desc="streaming blocks", unit="block", disable=not progress)):
        with lm.weights.loaded(block, f"{lm.blocks_path}.{i}."):
            for b in range(len(batches)):
                _, args, kwargs = calls[b][i]
                out = block(hidden[b], *args, **kwargs)
                hidden[b] = out[0] if isinstance(out, (tuple, list)) else out
                add(hidden[b], b)
