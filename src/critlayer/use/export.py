"""Export a scan's choice of blocks where fine-tuning tools read it.

``json``: a plain list of block indices. ``peft``: a PEFT ``LoraConfig`` adapting the linear
layers of those blocks, as the ``adapter_config.json`` that ``LoraConfig.from_pretrained`` reads.
``axolotl``: an ``unfrozen_parameters`` YAML list of regular expressions. Only the scan is needed.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

from ..common.errors import CritlayerError
from ..common.folders import write_atomically
from ..find.result import ScanResult
from ..train.targets import LORA_ALPHA, LORA_R, lora_config, unfrozen_parameters
from .layers import choose_lens, resolve_layers

FORMATS = ("json", "peft", "axolotl")


def export(scan: ScanResult | str | Path, *, layers: str | None = None, score: str | None = None,
           validation=None, format: str = "json", lora_r: int = LORA_R, lora_alpha: int = LORA_ALPHA,
           seed: int = 0, out: str | Path | None = None, r: int | None = None, alpha: int | None = None) -> str:
    """A scan's critical blocks (its firm ones, where it measured firmness), or those ``layers`` names
    (``critical:K`` ranked by ``score``, firm blocks first, or with ``validation`` by the lens it found best), as
    ``format``: a JSON list, PEFT's ``adapter_config.json`` (LoRA of rank ``lora_r``, ``lora_alpha``) or an axolotl
    list;
    written to ``out`` when given, and returned. A scan with no firm block has nothing to export by default: name the blocks with ``layers``.

    >>> result = critlayer.scan(model_folder, probes="random", n=16, max_tokens=12, progress=False)
    >>> critlayer.export(result, layers="1,3")
    '[1, 3]\\n'
    """
    if r is not None or alpha is not None:
        warnings.warn("export's r and alpha are now lora_r and lora_alpha; the old names go in the next release",
                      DeprecationWarning, stacklevel=2)
        lora_r, lora_alpha = r or lora_r, alpha or lora_alpha
    if min(lora_r, lora_alpha) < 1:
        raise CritlayerError(f"--lora-r and --lora-alpha must be at least 1, got {lora_r} and {lora_alpha}")
    if seed < 0:
        raise CritlayerError(f"--seed must be at least 0, got {seed}")
    result = scan if isinstance(scan, ScanResult) else ScanResult.load(scan)
    if layers is None and not result.critical:
        raise CritlayerError("no block of this scan is firm, so it has no critical blocks to export; name them "
                             "with --layers (critical:K takes the K top-ranked)")
    lens = choose_lens(result, validation, score, model=result.model)
    blocks = list(result.critical) if layers is None else resolve_layers(len(result.layers), layers, lens, seed=seed)
    text = export_text(result, blocks, format, r=lora_r, alpha=lora_alpha)
    if out is not None:
        write_atomically(Path(out), text)
    return text


def export_text(result: ScanResult, blocks: list[int], fmt: str, *, r: int, alpha: int) -> str:
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
