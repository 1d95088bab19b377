"""llama.cpp as an engine (the optional ``llamacpp`` extra, its Python binding): a GGUF file run by llama.cpp itself,
called like a transformers model so that critlayer's evaluation scores it on the same token ids; and llama.cpp's own
quantizer (the call llama-quantize makes), for the types only it writes (K-quants, IQ types) and for any type weighted
by an importance matrix.

llama.cpp computes with the quantized blocks as stored (its own dot products, activations rounded where its kernels
do), transformers with them dequantized to floats: the two agree closely but not bit for bit, which is what
checking a written GGUF in llama.cpp measures.
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from ..common.errors import CritlayerError

NEEDS_IMATRIX = ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M")  # llama.cpp aborts quantizing these without one
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


@cache
def _ggml():
    """llama.cpp's tensor library as the binding ships it (loaded by the binding's own loader, for any platform),
    with the quantizer's signature declared."""
    from llama_cpp._ctypes_extensions import load_shared_library

    lib = load_shared_library("ggml-base", Path(require().__file__).parent / "lib")
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


def quantize_rows(rows: np.ndarray, kind: str, importance: np.ndarray | None = None) -> np.ndarray:
    """``rows`` (outputs over inputs) stored as llama.cpp's type ``kind`` by llama.cpp's own quantizer
    (``ggml_quantize_chunk``, what llama-quantize calls), weighted by ``importance`` (one value per input: an
    importance matrix's diagonal) where given; the bytes as gguf holds them, one row of blocks per row."""
    import gguf

    kind_id = gguf.GGMLQuantizationType[kind]
    block, size = gguf.GGML_QUANT_SIZES[kind_id]
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    weights = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[1] % block:  # llama.cpp would write past the buffer
        raise CritlayerError(f"{kind} stores rows in blocks of {block}; got rows of shape {rows.shape}")
    if weights is not None and weights.shape != (rows.shape[1],):
        raise CritlayerError(f"an importance matrix of shape {weights.shape} for rows of {rows.shape[1]} weights")
    if weights is None and kind in NEEDS_IMATRIX:  # llama.cpp would abort the process
        raise CritlayerError(f"llama.cpp quantizes {kind} only with an importance matrix")
    n, width = rows.shape
    out = np.empty((n, width // block * size), dtype=np.uint8)
    written = _ggml().ggml_quantize_chunk(int(kind_id), rows.ctypes.data, out.ctypes.data, 0, n, width,
                                          None if weights is None else weights.ctypes.data)
    if written != out.nbytes:
        raise CritlayerError(f"llama.cpp wrote {written} bytes of {kind} for {out.nbytes} expected")
    return out


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
