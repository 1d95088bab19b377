"""GGUF files: dequantise once with transformers and keep the result as safetensors; write a pruned copy.

Loading a GGUF dequantises every tensor (slow); ``save_pretrained`` then refuses because
the model is marked as quantised. Clearing those marks lets us save plain safetensors
that reload in about a second. A pruned or requantised copy is written with gguf's own reader, writer and
quantizers.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

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


K_FILE_TYPES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}  # the file types named after these

PATTERN_MOVES = ("a pruned GGUF cannot say which blocks use full attention: llama.cpp and transformers derive them "
                 "from a fixed pattern, which would move them; use the safetensors checkpoint instead")


def keeps_layer_pattern(layer_types: list[str] | None, kept: list[int]) -> bool:
    """Whether the kept blocks' attention kinds are what a loader derives for that many blocks: the start of the
    same pattern (always so where every block is of one kind)."""
    return not layer_types or len(set(layer_types)) == 1 or [layer_types[i] for i in kept] == layer_types[:len(kept)]


def write_pruned_gguf(source: Path, out: Path, kept: list[int], layer_types: list[str] | None = None) -> dict:
    """Copy the GGUF file ``source`` keeping only the blocks ``kept`` (original indices, in order), atomically.

    Tensors keep their bytes (their quantisation too) and take their new block numbers; the block count and
    every per-layer metadata array are shortened. GGUF has no per-layer attention type: loaders derive it from a
    fixed pattern, so where ``layer_types`` (the model config's, before pruning) mix kinds, the kept blocks must
    follow the same pattern from the start, or the file is refused rather than silently changed. Returns what the
    file was read back to hold (``read_back``).
    """
    import gguf

    if not keeps_layer_pattern(layer_types, kept):
        raise CritlayerError(PATTERN_MOVES)
    reader = gguf.GGUFReader(source)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    count_key = gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch)
    total = int(reader.get_field(count_key).contents())
    renumber = {old: new for new, old in enumerate(kept)}

    def value(field):
        if field.name == count_key:
            return len(kept)
        contents = field.contents()
        if field.types[0] == gguf.GGUFValueType.ARRAY and field.name.startswith(f"{arch}.") and len(contents) == total:
            return [contents[i] for i in kept]
        return contents

    tensors = [(_renamed(t.name, renumber), t.data, t.tensor_type) for t in reader.tensors]
    return _rewrite(reader, out, value, [t for t in tensors if t[0] is not None])


def write_requantized_gguf(source: Path, out: Path, types: dict[str, str],
                           encoders: dict[str, Callable[[np.ndarray], np.ndarray]] | None = None) -> dict:
    """Copy the GGUF file ``source`` with each tensor named in ``types`` dequantised and quantised again to its type,
    atomically: by ``encoders[name]`` (its float rows to the bytes of its type: llama.cpp's own quantizer, for the
    types only it writes or an importance matrix) where given, else by the gguf package (Q4_0 ... Q8_0, MXFP4, F16).
    The file type becomes that of the type holding the most of those weights (MXFP4 has none for dense models).
    Returns what the file was read back to hold (``read_back``)."""
    import gguf

    reader = gguf.GGUFReader(source)
    by_name = {t.name: t for t in reader.tensors}
    missing = sorted(set(types) - set(by_name))
    if missing:
        raise CritlayerError(f"{source} has no tensor {missing[0]} (of {len(missing)} the plan names)")
    weights: dict[str, int] = {}
    for name, kind in types.items():
        kind = K_FILE_TYPES.get(kind, kind)
        if f"MOSTLY_{kind}" in gguf.LlamaFileType.__members__:
            weights[kind] = weights.get(kind, 0) + int(by_name[name].n_elements)
    file_type = gguf.LlamaFileType[f"MOSTLY_{max(weights, key=weights.get)}"] if weights else gguf.LlamaFileType.GUESSED

    def value(field):
        return int(file_type) if field.name == gguf.Keys.General.FILE_TYPE else field.contents()

    tensors = []
    for t in reader.tensors:
        if t.name in types:
            kind = gguf.GGMLQuantizationType[types[t.name]]
            rows = gguf.quants.dequantize(t.data, t.tensor_type)
            encode = (encoders or {}).get(t.name) or partial(gguf.quants.quantize, qtype=kind)
            tensors.append((t.name, encode(rows), kind))
        else:
            tensors.append((t.name, t.data, t.tensor_type))
    return _rewrite(reader, out, value, tensors)


def _rewrite(reader, out: Path, value, tensors: list[tuple[str, object, object]]) -> dict:
    """Write the reader's metadata (each field's value as ``value(field)`` gives it) and ``tensors`` (name, data as
    gguf holds it, type) to ``out``, atomically, and read it back (``read_back``) before it takes its name."""
    import gguf

    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}-")
    os.close(handle)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        for field in reader.fields.values():
            if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                continue  # the writer writes these itself
            kind = field.types[0]
            sub_type = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, value(field), kind, sub_type=sub_type)
        for name, data, kind in tensors:
            writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes, kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, data, _ in tensors:
            writer.write_tensor_data(data, tensor_endianess=reader.endianess)
        writer.close()
        held = read_back(Path(tmp), {name: kind.name for name, _, kind in tensors})
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return held


def read_back(path: Path, planned: dict[str, str]) -> dict:
    """What a written GGUF file holds, read with gguf's own reader: refused where a tensor is missing or holds
    another type than ``planned`` (name: type); else the tensors' real bits per weight: all of them, and the blocks'
    matrices alone (what a bit plan counts: not their norms)."""
    import gguf

    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    wrong = [(name, kind, tensors[name].tensor_type.name if name in tensors else "nothing")
             for name, kind in planned.items() if name not in tensors or tensors[name].tensor_type.name != kind]
    if wrong or len(tensors) != len(planned):
        name, kind, held = wrong[0] if wrong else (sorted(set(tensors) - set(planned))[0], "nothing", "a tensor")
        raise CritlayerError(f"the GGUF file written holds {held} as {name}, not the planned {kind}: not written")

    def bits(names: list[str]) -> float:
        stored = sum(int(tensors[n].n_bytes) for n in names)
        return round(8 * stored / sum(int(tensors[n].n_elements) for n in names), 4)

    blocks = [n for n, t in tensors.items() if n.startswith("blk.") and len(t.shape) > 1]
    return {"read_back": f"all {len(tensors)} tensors hold their planned types", "bits_per_weight": bits(list(tensors)),
            "block_bits_per_weight": bits(blocks) if blocks else None, "bytes": path.stat().st_size}


def read_back_text(written: dict) -> str:
    """What a result says of a GGUF file it wrote and read back (nothing before it is written)."""
    if "read_back" not in written:
        return ""
    return (f" (read back: {written['read_back']}; {written['block_bits_per_weight']} bits per block weight, "
            f"{written['bits_per_weight']} over every tensor)")


def gguf_tensor_name(architecture: str, num_layers: int, module: str) -> str | None:
    """The GGUF name of a Hugging Face module's weight (``model.layers.3.self_attn.q_proj`` ->
    ``blk.3.attn_q.weight``) by gguf's own name map, None where the architecture or the module has none."""
    import gguf

    names = {architecture.replace("_", ""), architecture.removesuffix("_text")}  # gpt_neox, gemma3_text
    arch = next((a for a, name in gguf.MODEL_ARCH_NAMES.items() if name in names), None)
    if arch is None:
        return None
    name = gguf.get_tensor_name_map(arch, num_layers).get_name(module)
    return None if name is None else f"{name}.weight"


def _renamed(name: str, renumber: dict[int, int]) -> str | None:
    """``blk.7.attn_q.weight`` under its new block number, None for a deleted block's tensor; others unchanged."""
    parts = name.split(".")
    if parts[0] != "blk":
        return name
    new = renumber.get(int(parts[1]))
    return None if new is None else ".".join(["blk", str(new), *parts[2:]])
