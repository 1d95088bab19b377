"""Time to a firm answer: the default scan against what it replaces and the floors under it.

On one model, dtype and thread count, in one process, with every weight resident first, side by side:

  firm scan        ``critlayer.scan`` as ``make demo`` runs it: generated probes written and captured in one
                   pass, in rounds of 64 until the answer is firm (or ``--max-n``)
  writing alone    critlayer's sampler writing the same number of probes, nothing captured (the floor: the
                   probes need the head's logits at every token)
  generate alone   transformers' ``generate`` sampling as many probes of the same length, as critlayer sampled
                   before it wrote its own (batches of 64, temperature 1, no top-k or top-p)
  bare forward     a forward through the blocks only over the firm scan's probe tokens (what a second pass
                   over them costs)
  fixed two-pass   the scan before one pass and rounds: ``generate`` samples 256 probes, then a forward over
                   them captures the blocks, then the measures (the probes handed to ``critlayer.scan``)

Each method runs ``--rounds`` times in turn, and each figure is the median; the ratios divide medians of
the same run. Results: ``firm.json`` and ``firm.txt`` in ``--out``.

    python bench/firm.py --models smollm2-135m gemma3-270m --rounds 1
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import critlayer
from critlayer.find.capture import padded_batch
from critlayer.find.probes import Probes
from critlayer.find.sampler import BATCH_SIZE, end_tokens, start_token, write_probes
from critlayer.models import running

TOKENS = 64


def cpu_flags() -> str:
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    return " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags) or "unknown"


def hf_generate(lm, n: int, seed: int) -> list[list[int]]:
    """Sampling as critlayer did before it wrote its own probes: ``generate`` in batches of 64."""
    start, ends = start_token(lm), end_tokens(lm)
    sequences = []
    torch.manual_seed(seed)
    with torch.inference_mode():
        for begin in range(0, n, BATCH_SIZE):
            ids = torch.full((min(BATCH_SIZE, n - begin), 1), start, dtype=torch.long, device=lm.device)
            out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                    top_k=0, top_p=1.0, max_new_tokens=TOKENS - 1, min_new_tokens=1,
                                    pad_token_id=next(iter(ends), start))
            for row in out.tolist():
                end = next((i for i, t in enumerate(row[1:], 1) if t in ends), len(row))
                sequences.append(row[:end])
    return sequences


def bare_forward(lm, token_ids: list[list[int]], batch_size: int = 16) -> None:
    order = sorted(token_ids, key=len, reverse=True)
    with running.watching(lm), torch.inference_mode():
        for begin in range(0, len(order), batch_size):
            ids, mask = padded_batch(order[begin:begin + batch_size], lm.device)
            running.forward_blocks(lm, ids, mask)


def timed(work) -> tuple[float, object]:
    start = time.perf_counter()
    out = work()
    return time.perf_counter() - start, out


def bench_model(name: str, dtype: str, rounds: int, max_n: int) -> dict:
    lm = critlayer.load(name, dtype=dtype)
    with torch.inference_mode():
        for p in lm.model.parameters():
            p.sum()  # memory-mapped weights: read them all before anything is timed
    times: dict[str, list[float]] = {}
    answers = []
    for _ in range(rounds):
        seconds, result = timed(lambda: critlayer.scan(lm, max_n=max_n, progress=False))
        times.setdefault("firm scan", []).append(seconds)
        answers.append(result)
        n = len(result.probe_ids)
        times.setdefault("writing alone", []).append(
            timed(lambda: [write_probes(lm, range(b, min(n, b + BATCH_SIZE)), TOKENS, 0)
                           for b in range(0, n, BATCH_SIZE)])[0])
        times.setdefault("generate alone", []).append(timed(lambda: hf_generate(lm, n, 0))[0])
        times.setdefault("bare forward", []).append(timed(lambda: bare_forward(lm, result.probe_ids.token_ids))[0])
        seconds_probes, old = timed(lambda: hf_generate(lm, 256, 0))
        seconds_scan, _ = timed(lambda: critlayer.scan(lm, probes=Probes("generated", old), n=256, progress=False))
        times.setdefault("fixed two-pass", []).append(seconds_probes + seconds_scan)
    median = {method: statistics.median(values) for method, values in times.items()}
    last = answers[-1]
    return {"model": name, "dtype": str(lm.dtype).removeprefix("torch."), "probes_read": len(last.probe_ids),
            "tokens": sum(map(len, last.probe_ids.token_ids)), "firm": last.firmness.firm,
            "tentative": last.firmness.tentative, "stopped": last.firmness.stopped, "seconds": median,
            "ratios": {"firm scan / fixed two-pass": median["firm scan"] / median["fixed two-pass"],
                       "firm scan / writing alone": median["firm scan"] / median["writing alone"],
                       "firm scan / generate alone": median["firm scan"] / median["generate alone"],
                       "writing alone / generate alone": median["writing alone"] / median["generate alone"]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--max-n", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args()
    rows = [bench_model(m, args.dtype, args.rounds, args.max_n) for m in args.models]
    meta = {"cpu_flags": cpu_flags(), "threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "critlayer": critlayer.__version__}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "firm.json").write_text(json.dumps({"meta": meta, "models": rows}, indent=1))
    lines = [f"CPU flags: {meta['cpu_flags']}; {meta['threads']} threads", ""]
    for row in rows:
        lines.append(f"{row['model']} ({row['dtype']}): {row['probes_read']} probes, {row['tokens']} tokens; firm "
                     f"{row['firm']}, tentative {row['tentative']}; {row['stopped']}")
        lines += [f"  {method:<16} {seconds:8.1f} s" for method, seconds in row["seconds"].items()]
        lines += [f"  {ratio:<32} {value:6.2f}" for ratio, value in row["ratios"].items()]
        lines.append("")
    (args.out / "firm.txt").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
