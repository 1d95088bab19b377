"""GGUF files: dequantise once with transformers and keep the result as safetensors; write a pruned copy.

Loading a GGUF dequantises every tensor (slow); ``save_pretrained`` then refuses because
the model is marked as quantised. Clearing those marks lets us save plain safetensors
that reload in about a second. A pruned copy is written with gguf's own reader and writer.
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


PATTERN_MOVES = ("a pruned GGUF cannot say which blocks use full attention: llama.cpp and transformers derive them "
                 "from a fixed pattern, which would move them; use the safetensors checkpoint instead")


def keeps_layer_pattern(layer_types: list[str] | None, kept: list[int]) -> bool:
    """Whether the kept blocks' attention kinds are what a loader derives for that many blocks: the start of the
    same pattern (always so where every block is of one kind)."""
    return not layer_types or len(set(layer_types)) == 1 or [layer_types[i] for i in kept] == layer_types[:len(kept)]


def write_pruned_gguf(source: Path, out: Path, kept: list[int], layer_types: list[str] | None = None) -> Path:
    """Copy the GGUF file ``source`` keeping only the blocks ``kept`` (original indices, in order), atomically.

    Tensors keep their bytes (their quantisation too) and take their new block numbers; the block count and
    every per-layer metadata array are shortened. GGUF has no per-layer attention type: loaders derive it from a
    fixed pattern, so where ``layer_types`` (the model config's, before pruning) mix kinds, the kept blocks must
    follow the same pattern from the start, or the file is refused rather than silently changed.
    """
    import gguf

    if not keeps_layer_pattern(layer_types, kept):
        raise CritlayerError(PATTERN_MOVES)
    reader = gguf.GGUFReader(source)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    count_key = gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch)
    total = int(reader.get_field(count_key).contents())
    renumber = {old: new for new, old in enumerate(kept)}
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}-")
    os.close(handle)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        for field in reader.fields.values():
            if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                continue  # the writer writes these itself
            kind = field.types[0]
            value = field.contents()
            sub_type = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            if field.name == count_key:
                value = len(kept)
            elif sub_type is not None and field.name.startswith(f"{arch}.") and len(value) == total:
                value = [value[i] for i in kept]
            writer.add_key_value(field.name, value, kind, sub_type=sub_type)
        tensors = [(_renamed(t.name, renumber), t) for t in reader.tensors]
        tensors = [(name, t) for name, t in tensors if name is not None]
        for name, t in tensors:
            writer.add_tensor_info(name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, t in tensors:
            writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
        writer.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _renamed(name: str, renumber: dict[int, int]) -> str | None:
    """``blk.7.attn_q.weight`` under its new block number, None for a deleted block's tensor; others unchanged."""
    parts = name.split(".")
    if parts[0] != "blk":
        return name
    new = renumber.get(int(parts[1]))
    return None if new is None else ".".join(["blk", str(new), *parts[2:]])
