"""``critlayer merge``: keep a fine-tune's gain and forget less, by scaling its update block by block.

The update of block ``l`` (tuned weights minus base weights) is added back to the base scaled by ``scale[l]``:
by depth (LiNeS: the first block at ``--shallow``, the last at 1, linearly between, so that shallow blocks stay
near the base model) or by a scan score (the most critical block at 1, the least at ``--shallow``, linearly in
rank). Weights outside the blocks (embedding, final norm, head) take the mean scale. Both rules are evaluated beside
the plain fine-tune, uniform scaling at the same mean scale and the base model, on held-out text of the
fine-tuning source (the gain kept) and of a second source (what is forgotten). The chosen merge is written as a
checkpoint and as a mergekit configuration (task arithmetic with a weight per layer) that rebuilds it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..common.cost import Plan
from ..common.errors import CritlayerError
from ..common.folders import SavedResult, check_model_folder
from ..common.options import DTYPE_HELP, check_options, option
from ..data.text import check_source, load_data
from ..find.measures import DIRECTION
from ..find.result import ScanResult
from ..find.scan import scan_of
from ..models import LanguageModel
from ..models.checkpoint import save_checkpoint
from ..models.loading import DTYPES, load, model_folder, resolve_dtype
from ..models.mergekit import task_arithmetic
from ..models.running import computing_in
from .evaluation import evaluate

DEPTH = "depth"


@dataclass
class MergeConfig:
    """How to merge (each field is the CLI flag of that name)."""

    by: str = option(DEPTH, "what scales each block's update: depth (LiNeS) or any scan score (the most critical "
                            "block kept whole)")
    lens: str = option("consensus", "the scan score evaluated beside depth (or depth beside it, with --by SCORE)")
    shallow: float = option(0.0, "the scale of the least-kept block's update (the first block, by depth)", minimum=0,
                            below=1)
    data: str = option("bbc", "the fine-tuning source: held-out text where the gain is measured")
    also_data: str = option("wiki", "a second source, where what the merge forgets is measured")
    n_eval: int = option(32, "held-out texts", minimum=2)  # at most the fine-tune's own: none was trained on
    max_tokens: int = option(128, "tokens per text at most: the context", minimum=2)
    dtype: str = option("auto", DTYPE_HELP, choices=DTYPES)

    def __post_init__(self):
        check_options(self)
        for score in (self.by, self.lens):
            if score != DEPTH and score not in DIRECTION:
                raise CritlayerError(f"unknown rule {score!r}; choose depth or a scan score: {', '.join(DIRECTION)}")
        if self.also_data == self.data:
            raise CritlayerError(f"--also-data {self.also_data} is --data itself: name another source")
        check_source(self.data, self.n_eval + 1)
        check_source(self.also_data, self.n_eval + 1)


@dataclass
class MergeResult(SavedResult, file="merge.json", kind="merge"):
    """Every rule's scales and held-out figures on both sources; the chosen merge's checkpoint and mergekit file."""

    settings: dict
    scales: dict[str, list[float]]
    figures: dict[str, dict[str, dict]]
    model: object = None  # the chosen merge: its folder holds it as a checkpoint
    tokenizer: object = None

    def to_json(self) -> dict:
        return {**self.settings, "scales": self.scales, "figures": self.figures}

    @classmethod
    def from_json(cls, data: dict) -> "MergeResult":
        return cls({k: v for k, v in data.items() if k not in ("scales", "figures")}, data["scales"],
                   data["figures"])

    def table(self) -> str:
        s = self.settings
        sources = [s["data"], s["also_data"]]
        lines = [f"merged {s['tuned']} into {s['base']} by {s['by']} (mean scale {s['mean_scale']:.3f}); held-out "
                 f"perplexity ({s['n_eval']} texts each), KL to the base, and the perplexity over {s['by']}'s "
                 "(95% paired interval):",
                 f"  {'merge':<16} {sources[0] + ' (gain)':>34} {sources[1] + ' (forgetting)':>34}"]
        for name, figures in self.figures.items():
            cells = [f"{figures[src]['perplexity']:>9.3f} {figures[src]['kl']:7.4f} {_ratio(figures[src]):>15}"
                     for src in sources]
            lines.append(f"  {name:<16} {cells[0]:>34} {cells[1]:>34}")
        return "\n".join(lines)

    def write_files(self, folder: Path) -> None:
        from ..report.merging import plot_merge

        if self.model is not None:
            save_checkpoint(self.model, self.tokenizer, folder)
            (folder / "mergekit.yml").write_text(task_arithmetic(self.settings["base_folder"],
                                                                 self.settings["tuned_folder"],
                                                                 self.scales[self.settings["by"]],
                                                                 self.settings["saved_dtype"]))
        plot_merge(self, folder / "merge.png")


def _ratio(figures: dict) -> str:
    """A merge's perplexity over the chosen rule's, as its interval (the chosen rule itself: nothing)."""
    interval = figures.get("ratio_to_chosen")
    return "" if interval is None else f"x{interval[0]:.3f}-{interval[1]:.3f}"


def merge(base: str, tuned: str, config: MergeConfig | None = None, *, scan: ScanResult | str | Path | None = None,
          out: str | Path | None = None, force: bool = False, progress: bool = True, device: str | None = None,
          **options) -> MergeResult:
    """Merge the fine-tune ``tuned`` (a model folder) back into ``base`` with its update scaled block by block by
    ``config.by``, and compare the rules on held-out text of both sources; with ``out``, write the chosen merge as a
    checkpoint, its mergekit.yml, merge.json and merge.png there.

    >>> result = critlayer.merge(model_folder, model_folder, lens="depth", data=text_file, also_data="wiki",
    ...                          n_eval=4, max_tokens=10, progress=False)
    >>> result.scales["depth"][0], result.scales["depth"][-1]
    (0.0, 1.0)
    """
    config = replace(config, **options) if config is not None else MergeConfig(**options)
    if out is not None:
        check_model_folder(Path(out), force)
    lm = load(base, dtype="float32", device=device)
    tuned_lm = load(tuned, dtype="float32", device=device)
    base_weights, update = _update(lm, tuned_lm)
    del tuned_lm
    needs_scan = any(rule != DEPTH for rule in (config.by, config.lens))
    result_scan = scan_of(lm, scan, dtype=config.dtype, progress=progress) if needs_scan else None
    rules = list(dict.fromkeys([config.by, config.lens]))
    scales = {rule: block_scales(rule, lm.num_layers, config.shallow, result_scan) for rule in rules}
    mean = float(np.mean(scales[config.by]))
    scales |= {"uniform": [mean] * lm.num_layers, "fine-tune": [1.0] * lm.num_layers}
    variants = {name: _merged(lm, base_weights, update, s) for name, s in scales.items()}
    compute = lambda: computing_in(lm.model, resolve_dtype(config.dtype, str(lm.device)))  # noqa: E731
    figures: dict[str, dict[str, dict]] = {"base": {}, **{name: {} for name in scales}}
    texts = {source: load_data(lm, source, n_eval=config.n_eval, max_tokens=config.max_tokens).heldout
             for source in (config.data, config.also_data)}
    plan = Plan(f"merge of {lm.name}")
    for source, heldout in texts.items():
        plan.add(f"evaluation on {source}", 1 + len(variants), sum(map(len, heldout)))
    plan.announce(progress)
    for source, heldout in texts.items():
        reference, scores = evaluate(lm, heldout, variants, compute=compute, progress=progress)
        for name, score in {"base": reference, **scores}.items():
            figures[name][source] = score.summary()
            if name != config.by:  # paired over the same texts: is the chosen rule better beyond the noise?
                interval = score.perplexity_ratio_interval(scores[config.by])
                figures[name][source]["ratio_to_chosen"] = [round(x, 4) for x in interval]
    settings = {"base": lm.name, "tuned": str(tuned), "base_folder": str(model_folder(lm.spec)[1]),
                "tuned_folder": str(model_folder(str(tuned))[1]), "by": config.by, "config": asdict(config),
                "mean_scale": round(mean, 6), "data": config.data, "also_data": config.also_data,
                "n_eval": config.n_eval, "saved_dtype": "float32",
                "outside_blocks": "embedding, final norm and head take the mean scale"}
    merged = None
    if out is not None:  # the chosen merge, kept: the variant restores the base when it ends
        with variants[config.by]():
            state = {k: v.detach().clone() for k, v in lm.model.state_dict().items()}
        lm.model.load_state_dict(state)
        merged = lm.model
    result = MergeResult(settings, scales, figures, merged, lm.tokenizer)
    if out is not None:
        result.save(out, force=force)
    return result


def block_scales(rule: str, n: int, shallow: float, scan: ScanResult | None) -> list[float]:
    """Each block's scale: by depth from ``shallow`` (block 0) to 1 (the last), or by a scan score from 1 (the most
    critical) to ``shallow`` (the least), linearly."""
    steps = np.linspace(shallow, 1.0, n) if n > 1 else np.ones(1)
    if rule == DEPTH:
        return [round(float(v), 6) for v in steps]
    order = scan.ranking(rule, list(range(n)))  # most critical first
    out = [0.0] * n
    for rank, block in enumerate(order):
        out[block] = round(float(steps[n - 1 - rank]), 6)
    return out


def _update(lm: LanguageModel, tuned: LanguageModel) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The base's weights and the fine-tune's update (tuned minus base), by name; a tuned model of another shape is
    refused in one line."""
    base, other = lm.model.state_dict(), tuned.model.state_dict()
    if base.keys() != other.keys() or any(base[k].shape != other[k].shape for k in base):
        raise CritlayerError(f"{tuned.name} is not a fine-tune of {lm.name}: their weights differ in names or shapes")
    return ({k: v.detach().clone() for k, v in base.items()},
            {k: (other[k].detach() - base[k].detach()) for k in base})


def _block_of(name: str, blocks_path: str) -> int | None:
    prefix = blocks_path + "."
    return int(name[len(prefix):].split(".")[0]) if name.startswith(prefix) else None


def _merged(lm: LanguageModel, base: dict, update: dict, scales: list[float]):
    """A variant: the base with every block's update added back at its scale (outside the blocks the mean), then
    the base restored."""
    mean = float(np.mean(scales))

    @contextmanager
    def variant():
        params = lm.model.state_dict()
        try:
            with torch.no_grad():
                for name, tensor in params.items():
                    block = _block_of(name, lm.blocks_path)
                    scale = mean if block is None else scales[block]
                    tensor.copy_(base[name] + scale * update[name])
            yield None
        finally:
            with torch.no_grad():
                for name, tensor in params.items():
                    tensor.copy_(base[name])

    return variant

