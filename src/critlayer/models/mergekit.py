"""mergekit configurations: what the community's merging tool reads, so that a change critlayer makes can be rebuilt
(or carried further) there. A pruned model's kept blocks are a passthrough merge: the slices of the source model's
layers, in order, that mergekit users prune with."""

from __future__ import annotations

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
