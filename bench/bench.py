"""How much does a scan cost beyond the forward pass it cannot avoid, and what do peers pay?

Every measurement runs in a fresh process (so peak memory is its own) on the same model, probe
tokens, dtype and thread count, from a model whose every weight is already resident (so peaks count
the method's memory, not which weights its tokens page in); methods take turns within each repeat,
so drift hits all alike:

  bare                a forward through the decoder only (no hooks, no logits), length-sorted batches
  critlayer           ``critlayer.scan`` with the data-oblivious measures (cka, influence, spectral)
  pytorch-cka         pytorch-cka's CKA matrix over the same blocks and batches (hooks on each block; run on
                      the decoder, spared the LM head like the bare forward; no attention mask, whole sequences)
  short-transformers  short-transformers' ``analyse_layers`` at its default batch size of 1 (angular distance of
                      every block pair, on the CPU, in Python), with a shim for transformers 5's block outputs

Peers are imported from the benchmark environment (``make bench`` installs them there, never in
the project's). Results: ``bench.json`` and ``bench.txt`` (ratios to ``bare`` from the same run).

    python bench/bench.py --models smollm2-135m --probes 256 --modes last --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("bare", "critlayer", "pytorch-cka", "short-transformers")
TOKENS = 64  # at most, per probe


def run_one(spec: dict) -> dict:
    """One measurement in this process: load, build probes, then time and measure the method alone."""
    import torch

    torch.set_num_threads(spec["threads"])
    import critlayer
    from critlayer.memory import PeakMemory

    lm = critlayer.load(spec["model"], dtype=spec["dtype"])
    _page_in(lm)
    probes = critlayer.make_probes(lm, "wiki", n=spec["n"], max_tokens=TOKENS, seed=0, progress=False)
    work = {"bare": _bare, "critlayer": _critlayer, "pytorch-cka": _pytorch_cka,
            "short-transformers": _short_transformers}[spec["method"]]
    with PeakMemory(lm.device) as peak:
        start = time.perf_counter()
        work(lm, probes, spec["mode"])
        seconds = time.perf_counter() - start
    return {**spec, "seconds": round(seconds, 3), "peak_above_model_mb": peak.megabytes,
            "peak_process_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "tokens": sum(map(len, probes.token_ids)), "dtype_used": str(lm.dtype)}


def _page_in(lm) -> None:
    """Read every weight once. Weights are memory-mapped from safetensors and come in as they are first
    read (gemma3's 262k-row embedding only as its tokens appear), so without this a method's peak would
    count how many distinct tokens the probes hold; with it every method starts from the whole model."""
    import torch

    with torch.inference_mode():
        for tensor in (*lm.model.parameters(), *lm.model.buffers()):
            tensor.sum()


def _batches(lm, probes):
    """Length-sorted, right-padded batches of the probe tokens, as the scan makes them."""
    import torch
    from critlayer.capture import BATCH_SIZE

    order = sorted(range(len(probes)), key=lambda i: -len(probes.token_ids[i]))
    for first in range(0, len(order), BATCH_SIZE):
        seqs = [probes.token_ids[i] for i in order[first:first + BATCH_SIZE]]
        width = max(map(len, seqs))
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(seqs):
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        yield ids.to(lm.device), mask.to(lm.device)


def _bare(lm, probes, mode):
    import torch

    decoder = lm.model.base_model  # the blocks and final norm: no LM head, so no logits
    with torch.inference_mode():
        for ids, mask in _batches(lm, probes):
            decoder(input_ids=ids, attention_mask=mask, use_cache=False)


def _critlayer(lm, probes, mode):
    import critlayer

    critlayer.scan(lm, probes, token_mode=mode, measures=("cka", "influence", "spectral"), progress=False)


def _pytorch_cka(lm, probes, mode):
    from cka import CKA  # pytorch-cka: features are whole padded sequences; it has no token modes

    decoder = lm.model.base_model  # spared the LM head, as the bare forward is
    prefix = lm.blocks_path.removeprefix(f"{lm.model.base_model_prefix}.")
    layers = [f"{prefix}.{i}" for i in range(lm.num_layers)]
    batches = [ids for ids, _ in _batches(lm, probes) if len(ids) > 3]  # its HSIC estimator needs 4 rows
    with CKA(decoder, decoder, layers=layers, device=lm.device) as cka:
        cka._compare(batches, progress=False)


def _short_transformers(lm, probes, mode):
    from short_transformers import ShortTransformer
    from short_transformers.dist import angular_distance_all_tokens, angular_distance_last_token

    # short-transformers 1.0 reads result[0] of each block, as transformers 4 blocks returned tuples; with
    # transformers 5 blocks return the tensor, so hand its wrapper a tuple and the model loop the tensor.
    for block in lm.blocks:
        block.forward = (lambda f: lambda *a, **k: (f(*a, **k),))(block.forward)
    model = ShortTransformer.from_model(lm.model)
    for block in lm.blocks:
        block.forward = (lambda f: lambda *a, **k: f(*a, **k)[0])(block.forward)
    model.set_metric(angular_distance_last_token if mode == "last" else angular_distance_all_tokens)
    texts = [{"content": lm.tokenizer.decode(ids, skip_special_tokens=True)} for ids in probes.token_ids]
    model.analyse_layers(texts, tokenizer=lm.tokenizer, limit=len(texts), max_length=TOKENS)


def summarise(rows: list[dict]) -> tuple[list[dict], str]:
    """Median per (model, dtype, probes, mode, method), with ratios to ``bare`` of the same configuration."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["dtype"], row["n"], row["mode"], row["method"]), []).append(row)
    summary = []
    for (model, dtype, n, mode, method), runs in groups.items():
        ok = [r for r in runs if "error" not in r]
        bare = [r["seconds"] for r in groups.get((model, dtype, n, mode, "bare"), []) if "error" not in r]
        entry = {"model": model, "dtype": dtype, "n": n, "mode": mode, "method": method, "runs": len(runs)}
        if ok:
            entry.update(seconds=statistics.median(r["seconds"] for r in ok),  # medians: RSS peaks vary by run
                         peak_process_mb=statistics.median(r["peak_process_mb"] for r in ok),
                         peak_above_model_mb=statistics.median(r["peak_above_model_mb"] for r in ok),
                         peak_process_mb_max=max(r["peak_process_mb"] for r in ok))
            if bare:
                entry["ratio_to_bare"] = round(entry["seconds"] / statistics.median(bare), 3)
        else:
            entry["error"] = runs[0]["error"]
        summary.append(entry)
    lines = [f"{'model':<14} {'dtype':<8} {'probes':>6} {'mode':<4} {'method':<19} {'runs':>4} {'median s':>9} {'x bare':>7} "
             f"{'peak MB':>8} {'above model':>11}  (peak: median over runs of the process's peak RSS)"]
    for e in summary:
        if "error" in e:
            lines.append(f"{e['model']:<14} {e['dtype']:<8} {e['n']:>6} {e['mode']:<4} {e['method']:<19} {e['runs']:>4}  "
                         f"failed: {e['error']}")
            continue
        lines.append(f"{e['model']:<14} {e['dtype']:<8} {e['n']:>6} {e['mode']:<4} {e['method']:<19} {e['runs']:>4} {e['seconds']:>9.2f} "
                     f"{e.get('ratio_to_bare', float('nan')):>7.3f} {e['peak_process_mb']:>8.0f} {e['peak_above_model_mb']:>11.0f}")
    lines += _growth(summary)
    return summary, "\n".join(lines)


def _growth(summary: list[dict]) -> list[str]:
    """How much each method's median peak grows from the fewest probes to the most, per model, dtype and mode."""
    peaks: dict[tuple, dict[int, float]] = {}
    for e in summary:
        if "peak_process_mb" in e:
            peaks.setdefault((e["model"], e["dtype"], e["mode"], e["method"]), {})[e["n"]] = e["peak_process_mb"]
    lines = []
    for (model, dtype, mode, method), by_n in peaks.items():
        if len(by_n) > 1:
            low, high = min(by_n), max(by_n)
            lines.append(f"peak growth {model} {dtype} {mode} {method}: {by_n[low]:.0f} MB at {low} probes -> "
                         f"{by_n[high]:.0f} MB at {high} ({100 * (by_n[high] / by_n[low] - 1):+.1f}%)")
    return [""] + lines if lines else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--probes", default="256,2048", help="probe counts (wiki leads, 64 tokens at most)")
    parser.add_argument("--modes", default="last,all")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peer-repeats", type=int, default=1, help="repeats for the (slow) peers")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds one measurement may take")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--summarise", type=Path, help="only rebuild bench.json and bench.txt from runs.jsonl files here")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return
    if args.summarise:
        rows = [json.loads(line) for f in sorted(args.summarise.rglob("runs.jsonl")) for line in f.read_text().splitlines()]
        _write(args.summarise, rows, args.threads)
        return
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    log = (args.out / "runs.jsonl").open("a")  # every measurement as it lands: a crash loses none
    for model in args.models.split(","):
        for n in map(int, args.probes.split(",")):
            for mode in args.modes.split(","):
                for repeat in range(args.repeats):
                    for method in args.methods.split(","):
                        if method not in ("bare", "critlayer") and repeat >= args.peer_repeats:
                            continue
                        spec = {"model": model, "n": n, "mode": mode, "method": method, "repeat": repeat,
                                "threads": args.threads, "dtype": args.dtype}
                        rows.append(_measure(spec, args.timeout))
                        print(json.dumps(rows[-1]), flush=True)
                        log.write(json.dumps(rows[-1]) + "\n")
                        log.flush()
    _write(args.out, rows, args.threads)


def _write(folder: Path, rows: list[dict], threads: int) -> None:
    summary, table = summarise(rows)
    machine = {"python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
               "cores": os.cpu_count(), "threads": threads}
    (folder / "bench.json").write_text(json.dumps({"machine": machine, "summary": summary, "runs": rows}, indent=1))
    (folder / "bench.txt").write_text(table + "\n")
    print(table)


def _measure(spec: dict, timeout: int) -> dict:
    try:
        done = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"over {timeout} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {**spec, "error": (done.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    return json.loads(lines[-1])


if __name__ == "__main__":
    main()
