"""llama.cpp as an engine: a GGUF file run by llama.cpp itself (the optional ``llamacpp`` extra, its Python
binding), called like a transformers model so that critlayer's evaluation scores it on the same token ids.

llama.cpp computes with the quantized blocks as stored (its own dot products, activations rounded where its kernels
do), transformers with them dequantized to floats: the two agree closely but not bit for bit, which is what
checking a written GGUF in llama.cpp measures.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from ..common.errors import CritlayerError

INSTALL = "pip install 'critlayer[llamacpp]' (it builds llama.cpp from source; `make test-llamacpp` as tested)"


def require():
    """The ``llama_cpp`` module, or one line that says how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise CritlayerError(f"llama.cpp is not installed: {INSTALL}") from None
    return llama_cpp


def version() -> str:
    return f"llama-cpp-python {require().__version__}"


class LlamaCppModel:
    """``path`` loaded in llama.cpp for texts of up to ``context`` tokens; calling it with a right-padded batch
    returns float32 logits of the batch's shape (zeros on padding), each text run alone from an empty cache."""

    def __init__(self, path: str | Path, context: int, vocabulary: int):
        llama_cpp = require()
        try:
            self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=context, n_batch=context, n_ubatch=context,
                                       logits_all=True, verbose=False, n_threads=torch.get_num_threads())
        except ValueError as exc:  # the binding's word for a file llama.cpp could not load
            raise CritlayerError(f"llama.cpp cannot load {path}: {exc}") from None
        if (words := self.llm.n_vocab()) != vocabulary:
            self.llm.close()
            raise CritlayerError(f"{path} has {words} tokens in llama.cpp, the model {vocabulary}")

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_) -> SimpleNamespace:
        rows, width = input_ids.shape
        logits = np.zeros((rows, width, self.llm.n_vocab()), dtype=np.float32)
        for row in range(rows):
            n = int(attention_mask[row].sum())
            self.llm.reset()
            self.llm.eval(input_ids[row, :n].tolist())
            logits[row, :n] = self.llm.scores[:n]
        return SimpleNamespace(logits=torch.from_numpy(logits).to(input_ids.device))

    def close(self) -> None:
        self.llm.close()
