"""Export a scan's choice of blocks where fine-tuning tools read it.

``json``: a plain list of block indices. ``peft``: a PEFT ``LoraConfig`` adapting the linear
layers of those blocks, as the ``adapter_config.json`` that ``LoraConfig.from_pretrained`` reads.
``axolotl``: an ``unfrozen_parameters`` YAML list of regular expressions. Only the scan is needed.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from .errors import CritlayerError
from .layers import lora_config, unfrozen_parameters
from .result import ScanResult

FORMATS = ("json", "peft", "axolotl")


def export_text(result: ScanResult, blocks: list[int], fmt: str, *, r: int = 8, alpha: int = 16) -> str:
    """The file content for ``fmt``."""
    if fmt not in FORMATS:
        raise CritlayerError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not blocks:
        raise CritlayerError("no blocks to export")
    if fmt == "json":
        return json.dumps(blocks) + "\n"
    if fmt == "axolotl":
        lines = [f"# critlayer: blocks {blocks} of {result.model['name']}", "unfrozen_parameters:"]
        return "\n".join(lines + [f"  - '{pattern}'" for pattern in unfrozen_parameters(result.model, blocks)]) + "\n"
    with tempfile.TemporaryDirectory() as tmp:  # PEFT's own serialisation, exactly what it reloads
        lora_config(result.model, blocks, r=r, alpha=alpha).save_pretrained(tmp)
        return (Path(tmp) / "adapter_config.json").read_text(encoding="utf-8")
