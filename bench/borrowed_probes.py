"""Do a model's critical blocks hold when its probes are written by another model?

A model scanned block by block (``--stream``) cannot write its own probes: generation needs the whole model. The
way out measured here is to let a smaller model write them (its probes.json, or their text) and stream the large
model over them. On the two built-ins, each is scanned over probes written by itself (the default), by itself
with a third of its blocks removed (a smaller model of the same tokenizer), by the other built-in (decoded to text
and tokenized again) and over wiki text; each answer is compared with the default's: the critical blocks, and the
Spearman correlation of the delta profile.

    python bench/borrowed_probes.py --out bench-results/borrowed-probes

Results: ``borrowed.json`` and ``borrowed.txt`` in ``--out`` (with the CPU's flags).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import critlayer
from critlayer.common.stats import spearman
from critlayer.find.config import ScanConfig
from critlayer.find.probes import make_probes
from critlayer.models.surgery import delete_blocks
from scale import cpu_flags

BUILTINS = ("smollm2-135m", "gemma3-270m")
N = 128  # probes in every scan: what the default scan read on both built-ins


def written_by(writer: critlayer.LanguageModel, folder: Path) -> Path:
    """``N`` probes written by ``writer`` (its default generated probes), as text in a .jsonl file."""
    probes = make_probes(writer, "generated", n=N, max_tokens=ScanConfig.max_tokens, progress=False)
    path = folder / f"probes-by-{writer.name}.jsonl"
    path.write_text("".join(json.dumps({"text": writer.tokenizer.decode(ids, skip_special_tokens=True)}) + "\n"
                            for ids in probes.token_ids))
    return path


def smaller(name: str) -> critlayer.LanguageModel:
    """The built-in with a third of its blocks removed, from the end of its first quarter on: a smaller writer of
    the same tokenizer."""
    lm = critlayer.load(name)
    first, count = lm.num_layers // 4, lm.num_layers // 3
    delete_blocks(lm.model, list(range(first, first + count)))
    return critlayer.LanguageModel.wrap(lm.model, lm.tokenizer, f"{name}-without-{count}-blocks")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-results/borrowed-probes"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in BUILTINS:
        other = next(b for b in BUILTINS if b != name)
        own = critlayer.scan(name, n=N, progress=False)
        sources = {"itself (default)": None,
                   "itself, a third of its blocks removed": written_by(smaller(name), args.out),
                   f"{other} (as text)": written_by(critlayer.load(other), args.out), "wiki text": "wiki"}
        for writer, probes in sources.items():
            start = time.perf_counter()
            result = own if probes is None else critlayer.scan(name, probes=str(probes), n=N, progress=False)
            rows.append({"model": name, "probes written by": writer, "critical": result.critical,
                         "same as the default": result.critical == own.critical,
                         "delta spearman with the default": round(spearman(np.array(result.scores["delta"]),
                                                                           np.array(own.scores["delta"])), 3),
                         "seconds": round(time.perf_counter() - start, 1) if probes is not None else None})
            print(json.dumps(rows[-1]), flush=True)
    table = ["| model | probes written by | critical blocks | same as the default | "
             "delta's Spearman with the default |", "|---|---|---|---|---|"]
    table += [f"| {r['model']} | {r['probes written by']} | {', '.join(map(str, r['critical']))} | "
              f"{'yes' if r['same as the default'] else 'no'} | {r['delta spearman with the default']:.3f} |"
              for r in rows]
    machine = {"cpu_flags": cpu_flags(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    (args.out / "borrowed.json").write_text(json.dumps({"machine": machine, "probes": N, "runs": rows}, indent=1))
    (args.out / "borrowed.txt").write_text("\n".join(table) + f"\n\n{machine}\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
