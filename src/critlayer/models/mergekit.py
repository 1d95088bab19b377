"""mergekit configurations: what the community's merging tool reads, so that a change critlayer makes can be rebuilt
(or carried further) there. A pruned model's kept blocks are a passthrough merge (the slices of the source model's
layers, in order, that mergekit users prune with); a fine-tune scaled block by block is task arithmetic with a
weight per layer."""

from __future__ import annotations

import numpy as np
import yaml

PASSTHROUGH_USE = "mergekit-yaml mergekit.yml OUT (the mergekit extra: pip install 'critlayer[mergekit]')"


def layer_ranges(kept: list[int]) -> list[list[int]]:
    """Consecutive kept blocks as ``[start, end)`` ranges, mergekit's ``layer_range``."""
    ranges: list[list[int]] = []
    for i in sorted(kept):
        if ranges and ranges[-1][1] == i:
            ranges[-1][1] = i + 1
        else:
            ranges.append([i, i + 1])
    return ranges


def passthrough(source: str, kept: list[int], dtype: str) -> str:
    """The YAML of a passthrough merge that keeps ``kept`` blocks of the model at ``source`` (a folder or a hub id),
    in ``dtype``."""
    slices = [{"sources": [{"model": source, "layer_range": r}]} for r in layer_ranges(kept)]
    return yaml.safe_dump({"slices": slices, "merge_method": "passthrough", "dtype": dtype}, sort_keys=False)


def task_arithmetic(base: str, tuned: str, scales: list[float], dtype: str) -> str:
    """mergekit's task arithmetic with one weight per layer (a list of as many values as layers, which mergekit
    reads one per layer) and the mean for the tensors outside the layers."""
    mean = round(float(np.mean(scales)), 6)
    weight = [{"filter": name, "value": mean} for name in ("embed_tokens", "lm_head", "model.norm")]
    weight.append({"value": list(scales)})
    return yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": base,
                           "models": [{"model": tuned, "parameters": {"weight": weight}}],
                           "parameters": {"normalize": False, "lambda": 1.0}, "dtype": dtype}, sort_keys=False)
