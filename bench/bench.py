"""How much does a scan cost beyond the forward pass it cannot avoid, and what do peers pay?

On the same model, probe tokens, dtype and thread count, with every weight resident before anything
is measured (weights are memory-mapped, so a peak would otherwise count which weights a method's
tokens page in):

  bare                a forward through the blocks only (one hook, stopping after the last block: no final norm,
                      no logits) over the scan's own batches (length-sorted, padded to its width steps, with the
                      mask it passes: none for a causal model), as critlayer.models.running runs them
  critlayer           ``critlayer.scan`` with the data-oblivious measures (cka, influence, spectral)
  pytorch-cka         pytorch-cka's CKA matrix over the same blocks and batches (hooks on each block; run on
                      the decoder, spared the LM head like the bare forward; whole sequences, no attention mask)
  short-transformers  short-transformers' ``analyse_layers`` at its default batch size of 1 (angular distance of
                      every block pair, on the CPU, in Python), with a shim for transformers 5's block outputs

Time: one process per configuration runs every method once on a few probes to warm up, then
``--rounds`` rounds in which every method runs right beside a bare forward of its own (before it,
or after it in odd rounds); a method's cost is the median over rounds of its time over that bare
forward's, so the machine's slow spells (this one's bare forward took 5.2 to 10.3 s for the same
work within a few minutes) hit both sides of a ratio. Each round ends with the scan interleaved: every
batch's bare forward right before the scan's own, the two timed apart. The scan's own phase timings
(capture pass, each measure) are kept, beside the process's float32 matmul rate: the most the scan's exact
float32 work on its row sample could run at. Memory: each method once more in a fresh process, its peak
resident memory (model included) read from the kernel's high-water mark, reset just before it starts.

Peers are imported from the benchmark environment (``make bench`` installs them there, never in
the project's). Results: ``bench.json`` and ``bench.txt``.

    python bench/bench.py --models smollm2-135m --probes 256 --modes last --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

METHODS = ("bare", "critlayer", "pytorch-cka", "short-transformers")
PEERS = ("pytorch-cka", "short-transformers")
TOKENS = 64  # at most, per probe
WARM_UP = 32  # probes each method first runs on, untimed, so first-call costs stay out of the rounds


def prepare(spec: dict):
    """Load the model with every weight resident, and build the probes."""
    import torch

    torch.set_num_threads(spec["threads"])
    import critlayer

    lm = critlayer.load(spec["model"], dtype=spec["dtype"])
    with torch.inference_mode():  # weights are memory-mapped: read every one, so each method starts from the whole model
        for tensor in (*lm.model.parameters(), *lm.model.buffers()):
            tensor.sum()
    probes = critlayer.make_probes(lm, "wiki", n=spec["n"], max_tokens=TOKENS, seed=0, progress=False)
    return lm, probes


def run_memory(spec: dict) -> dict:
    """One method in this fresh process: its seconds and the process's peak resident memory while it runs."""
    from critlayer.common.memory import trim_heap

    lm, probes = prepare(spec)
    trim_heap()
    before = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # restart the kernel's peak (VmHWM) from the current RSS
    start = time.perf_counter()
    METHOD[spec["method"]](lm, probes, spec["mode"])
    seconds = time.perf_counter() - start
    peak = _status_mb("VmHWM")
    return {**spec, "kind": "memory", "seconds": round(seconds, 3), "peak_process_mb": peak,
            "peak_above_model_mb": round(peak - before, 1), "tokens": sum(map(len, probes.token_ids)),
            "dtype_used": str(lm.dtype).removeprefix("torch.")}


def run_timing(spec: dict):
    """Every method once on a few probes to warm up, then rounds: each method right beside a bare forward of
    its own (after it in odd rounds), the methods in a rotating order, then the scan interleaved batch by
    batch with a bare forward. Yields the process's float32 matmul rate, then each timed run."""
    from critlayer.find.probes import Probes

    lm, probes = prepare(spec)
    for method in spec["methods"]:
        METHOD[method](lm, Probes(probes.source, probes.token_ids[:WARM_UP]), spec["mode"])
    others = [m for m in spec["methods"] if m != "bare"]
    keys = {k: spec[k] for k in ("model", "n", "mode", "threads", "dtype")}
    yield {**keys, "kind": "matmul", "method": "bare", "gflops": _float32_matmul_gflops()}
    for round_ in range(spec["rounds"]):
        shift = round_ % max(len(others), 1)
        for method in others[shift:] + others[:shift]:
            if method in PEERS and round_ >= spec["peer_rounds"]:
                continue
            for name in ("bare", method)[::-1 if round_ % 2 else 1]:
                start = time.perf_counter()
                phases = METHOD[name](lm, probes, spec["mode"])
                yield {**keys, "kind": "time", "method": name, "round": round_, "pair": f"{round_}:{method}",
                       "seconds": round(time.perf_counter() - start, 3), **({"phases": phases} if phases else {})}
        if "critlayer" in others:
            seconds, bare = _critlayer_interleaved(lm, probes, spec["mode"])
            yield {**keys, "kind": "interleaved", "method": "critlayer", "round": round_, "seconds": round(seconds, 3),
                   "bare_seconds": round(bare, 3)}


def _float32_matmul_gflops() -> float:
    """This process's float32 matmul rate on a product the size of the CKA's (2,048 x 576 by 576 x 2,048), best
    of ten: what the scan's exact float32 work on its row sample can at best run at."""
    import torch

    a, b = torch.randn(2048, 576), torch.randn(576, 2048)
    seconds = []
    for _ in range(11):
        start = time.perf_counter()
        a @ b
        seconds.append(time.perf_counter() - start)
    return round(2 * 2048 * 576 * 2048 / min(seconds[1:]) / 1e9, 1)


def _status_mb(field: str) -> float:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return round(int(line.split()[1]) / 1024, 1)


def _batches(lm, probes):
    """The scan's batches of the probe tokens: length-sorted, right-padded to its width steps."""
    from critlayer.find.capture import BATCH_SIZE, padded_batch

    order = sorted(range(len(probes)), key=lambda i: -len(probes.token_ids[i]))
    for first in range(0, len(order), BATCH_SIZE):
        yield padded_batch([probes.token_ids[i] for i in order[first:first + BATCH_SIZE]], lm.device,
                           getattr(lm.config, "max_position_embeddings", None))


def _bare(lm, probes, mode):
    import torch
    from critlayer.models import running

    with torch.inference_mode(), running.watching(lm):  # no hook but the one that stops after the last block
        for ids, mask in _batches(lm, probes):
            running.forward_blocks(lm, ids, mask)


def _critlayer(lm, probes, mode) -> dict:
    """The scan; returns its own phase timings (capture pass, then each measure on the row sample)."""
    import critlayer

    timing = critlayer.scan(lm, probes=probes, token_mode=mode, measures=("cka", "influence", "spectral"),
                            progress=False).timing
    return {"capture": timing["capture"], **timing["measures"]}


def _critlayer_interleaved(lm, probes, mode) -> tuple[float, float]:
    """The scan, with a bare forward of every batch run (the scan's hooks off) right before the scan's own forward.

    Returns the scan's seconds without those bare forwards, and theirs: the two interleave batch by batch,
    so the machine's slow spells weigh on both alike.
    """
    from critlayer.models import running

    forward_blocks, bare = running.forward_blocks, []

    def bare_first(lm_, ids, mask):
        hooks = [(dict(b._forward_hooks), dict(b._forward_pre_hooks)) for b in lm.blocks]
        for block in lm.blocks:
            block._forward_hooks.clear()
            block._forward_pre_hooks.clear()
        start = time.perf_counter()
        with running.watching(lm):
            forward_blocks(lm_, ids, mask)
        bare.append(time.perf_counter() - start)
        for block, (after, before) in zip(lm.blocks, hooks):
            block._forward_hooks.update(after)
            block._forward_pre_hooks.update(before)
        forward_blocks(lm_, ids, mask)

    running.forward_blocks = bare_first
    try:
        start = time.perf_counter()
        _critlayer(lm, probes, mode)
        total = time.perf_counter() - start
    finally:
        running.forward_blocks = forward_blocks
    return total - sum(bare), sum(bare)


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
    try:
        model.analyse_layers(texts, tokenizer=lm.tokenizer, limit=len(texts), max_length=TOKENS)
    finally:
        for block in lm.blocks:  # its wrappers stay on the blocks otherwise: the next method would pay for them
            del block.forward


METHOD = {"bare": _bare, "critlayer": _critlayer, "pytorch-cka": _pytorch_cka, "short-transformers": _short_transformers}


def summarise(rows: list[dict]) -> tuple[list[dict], str]:
    """Per (model, dtype, probes, mode, method): median seconds and ratio to bare over rounds, and peak memory."""
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for row in rows:
        key = (row["model"], row["dtype"], row["n"], row["mode"], row["method"])
        groups.setdefault(key, {"time": [], "memory": [], "interleaved": [], "matmul": []})[row["kind"]].append(row)
    models, modes = (list(dict.fromkeys(key[i] for key in groups)) for i in (0, 3))  # in the order they ran
    order = sorted(groups, key=lambda key: (models.index(key[0]), key[1], key[2], modes.index(key[3]),
                                            METHODS.index(key[4])))
    summary = []
    for model, dtype, n, mode, method in order:
        kinds = groups[(model, dtype, n, mode, method)]
        entry = {"model": model, "dtype": dtype, "n": n, "mode": mode, "method": method}
        failed = [r for r in kinds["time"] + kinds["memory"] if "error" in r]
        timed = [r for r in kinds["time"] if "error" not in r]
        bare = {r["pair"]: r["seconds"] for r in groups.get((model, dtype, n, mode, "bare"), {}).get("time", [])
                if "error" not in r}
        if timed:
            ratios = [r["seconds"] / bare[r["pair"]] for r in timed if r["pair"] in bare]
            entry.update(runs=len(timed), seconds=statistics.median(r["seconds"] for r in timed))
            if ratios:
                entry.update(ratio_to_bare=round(statistics.median(ratios), 3),
                             ratio_range=[round(min(ratios), 3), round(max(ratios), 3)])
        phases = [r["phases"] for r in timed if "phases" in r]
        if phases:
            entry["phases"] = {name: statistics.median(p[name] for p in phases) for name in phases[0]}
        if kinds["matmul"]:
            entry["float32_matmul_gflops"] = statistics.median(r["gflops"] for r in kinds["matmul"])
        interleaved = [r["seconds"] / r["bare_seconds"] for r in kinds["interleaved"] if "error" not in r]
        if interleaved:
            entry.update(interleaved_runs=len(interleaved), interleaved_ratio=round(statistics.median(interleaved), 3),
                         interleaved_range=[round(min(interleaved), 3), round(max(interleaved), 3)])
        memory = [r for r in kinds["memory"] if "error" not in r]
        if memory:
            entry.update(peak_process_mb=memory[0]["peak_process_mb"], peak_above_model_mb=memory[0]["peak_above_model_mb"],
                         dtype_used=memory[0]["dtype_used"])
        if failed:
            entry["error"] = failed[0]["error"]
        summary.append(entry)
    header = (f"{'model':<14} {'dtype':<8} {'probes':>6} {'mode':<4} {'method':<19} {'runs':>6} {'median s':>9} "
              f"{'x bare':>7} {'(range)':>13} {'peak MB':>8} {'above model':>11}")
    lines = [header]
    for e in summary:
        ratio = f"{e['ratio_to_bare']:>7.3f} {'(%.3f-%.3f)' % tuple(e['ratio_range']):>13}" if "ratio_to_bare" in e else f"{'':>21}"
        seconds = f"{e['seconds']:>9.2f}" if "seconds" in e else f"{'':>9}"
        peak = (f"{e['peak_process_mb']:>8.0f} {e['peak_above_model_mb']:>11.0f}" if "peak_process_mb" in e
                else f"{'':>20}")
        note = f"  failed: {e['error']}" if "error" in e else ""
        lines.append(f"{e['model']:<14} {e['dtype']:<8} {e['n']:>6} {e['mode']:<4} {e['method']:<19} "
                     f"{e.get('runs', 0):>6} {seconds} {ratio} {peak}{note}")
    lines += _interleaved(summary) + _phases(summary) + _growth(summary)
    return summary, "\n".join(lines)


def _interleaved(summary: list[dict]) -> list[str]:
    """The scan against a bare forward of every batch run right before its own, per configuration."""
    lines = [f"  {e['model']} {e['dtype']} {e['n']} probes {e['mode']}: {e['interleaved_ratio']:.3f} x bare "
             f"(median of {e['interleaved_runs']} runs, {e['interleaved_range'][0]:.3f}-{e['interleaved_range'][1]:.3f})"
             for e in summary if "interleaved_ratio" in e]
    return ["", "critlayer, each batch's forward beside a bare forward of the same batch:"] + lines if lines else []


def _phases(summary: list[dict]) -> list[str]:
    """Where the scan's time goes (its own timings, median over rounds) beside the bare forward and the machine's
    float32 matmul rate, per configuration."""
    def config(e: dict) -> tuple:
        return e["model"], e["dtype"], e["n"], e["mode"]

    bare = {config(e): e for e in summary if e["method"] == "bare"}
    lines = []
    for e in summary:
        if "phases" in e:
            reference = bare.get(config(e), {})
            parts = ", ".join(f"{name} {seconds:.3f}" for name, seconds in e["phases"].items())
            beside = [f"bare forward {reference['seconds']:.2f} s"] if "seconds" in reference else []
            if "float32_matmul_gflops" in reference:
                beside.append(f"float32 matmul {reference['float32_matmul_gflops']:.0f} GFLOPS")
            lines.append(f"  {e['model']} {e['dtype']} {e['n']} probes {e['mode']}: {parts} s"
                         + (f" ({'; '.join(beside)})" if beside else ""))
    return ["", "critlayer's own phases (median s over rounds):"] + lines if lines else []


def _growth(summary: list[dict]) -> list[str]:
    """How much each method's peak grows from the fewest probes to the most, per model, dtype and mode."""
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
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds")
    parser.add_argument("--peer-rounds", type=int, default=7, help="rounds the (slow) peers take part in")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--timeout", type=int, default=7200, help="seconds one process may take")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--summarise", type=Path, help="only rebuild bench.json and bench.txt from runs.jsonl files here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        for row in (run_timing(spec) if spec["kind"] == "time" else [run_memory(spec)]):
            print(json.dumps(row), flush=True)
        return
    if args.summarise:
        rows = [json.loads(line) for f in sorted(args.summarise.rglob("runs.jsonl")) for line in f.read_text().splitlines()]
        _write(args.summarise, rows, args.threads)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with (args.out / "runs.jsonl").open("w") as log:  # every run as it lands: a crash loses none
        for model in args.models.split(","):
            for n in map(int, args.probes.split(",")):
                for mode in args.modes.split(","):
                    spec = {"model": model, "n": n, "mode": mode, "threads": args.threads, "dtype": args.dtype}
                    methods = args.methods.split(",")
                    children = [{**spec, "kind": "memory", "method": m} for m in methods]
                    children.append({**spec, "kind": "time", "methods": methods, "rounds": args.rounds,
                                     "peer_rounds": args.peer_rounds})
                    for child in children:
                        for row in _child(child, args.timeout):
                            rows.append(row)
                            print(json.dumps(row), flush=True)
                            log.write(json.dumps(row) + "\n")
                            log.flush()
    _write(args.out, rows, args.threads)


def _child(spec: dict, timeout: int):
    """Run one child process, yielding each result line as it prints it (or an error row per method)."""
    with tempfile.TemporaryFile("w+") as errors:
        process = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], stdout=subprocess.PIPE,
                                   stderr=errors, text=True)
        timer = threading.Timer(timeout, process.kill)
        timer.start()
        for line in process.stdout:
            if line.startswith("{"):
                yield json.loads(line)
        process.wait()
        timer.cancel()
        if process.returncode != 0:
            errors.seek(0)
            error = (errors.read().strip().splitlines() or ["no output"])[-1][:200]
            for method in spec.get("methods", [spec.get("method")]):
                yield {**{k: spec[k] for k in ("model", "n", "mode", "threads", "dtype", "kind")}, "method": method,
                       "round": 0, "error": error if process.returncode > 0 else f"killed (over {timeout} s?)"}


def _write(folder: Path, rows: list[dict], threads: int) -> None:
    summary, table = summarise(rows)
    machine = {"python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
               "cores": os.cpu_count(), "threads": threads}
    (folder / "bench.json").write_text(json.dumps({"machine": machine, "summary": summary, "runs": rows}, indent=1))
    (folder / "bench.txt").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
