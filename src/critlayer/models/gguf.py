"""GGUF files: dequantise once with transformers and keep the result as safetensors.

Loading a GGUF dequantises every tensor (slow); ``save_pretrained`` then refuses because
the model is marked as quantised. Clearing those marks lets us save plain safetensors
that reload in about a second.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..common.errors import CritlayerError, first_line
from ..common.fetch import home, sha256_file


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantise ``gguf`` into a Hugging Face folder at ``out`` (written atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:  # transformers raises many kinds for a bad file
        raise CritlayerError(f"cannot read GGUF file {gguf}: {first_line(exc)}") from None
    model.hf_quantizer = None
    model.is_quantized = False
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def cached_gguf_folder(gguf: Path) -> Path:
    """Convert a user's GGUF file once, keyed by its content hash."""
    if not gguf.is_file():
        raise CritlayerError(f"no such GGUF file: {gguf}")
    folder = home() / "models" / f"gguf-{sha256_file(gguf)[:16]}"
    if not (folder / "config.json").exists():
        convert_gguf(gguf, folder)
    return folder
