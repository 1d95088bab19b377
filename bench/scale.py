"""What a command costs at the sizes people run: peak resident memory, wall time and planned forward tokens.

Random-weight models built from the configurations of real families (the shape is what costs; random weights make
their answers mean nothing), with smollm2-135m's tokenizer, saved as bfloat16 safetensors as those families publish
their weights. Each command runs in a fresh process under ``/usr/bin/time -v``, one after another, on the same
machine:

  scan       the default measures on 64 wiki probes of 64 tokens (a fixed number: a random model never settles),
             with the whole model loaded, and block by block (``--stream``: the only command on larger shapes)
  prune      two blocks, the default score checked by the loss, no baselines
  quantize   4.5 bits, no baselines, no curve, with all six llama.cpp widths and with three of them
  kv         3 bits, the measured KV plan (every layer's keys and values alone at 2, 4 and 8 bits) and uniform,
             no curve, on 2 documents of 512 tokens

    python bench/scale.py --shapes llama-3.2-1b --out bench-results/scale

Results: ``scale.json`` and ``scale.txt`` in ``--out`` (with the CPU's flags; a run replaces the rows it measured
again and keeps the others). The models are built once and kept in ``--out`` (bfloat16: 2 bytes a parameter on
disk).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import torch
import transformers

SHAPES = {  # name: (family, the configuration's sizes)
    "llama-3.2-1b": ("llama", {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                               "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                               "tie_word_embeddings": True}),
    "qwen2.5-1.5b": ("qwen2", {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                               "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
                               "tie_word_embeddings": True}),
    "llama-3.1-8b": ("llama", {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                               "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                               "tie_word_embeddings": False}),
}
STREAMED = {"llama-3.1-8b"}  # larger than this machine's memory in float32 for prune and quantize: scanned by block
COMMON = ["--dtype", "bfloat16", "--force"]  # not --quiet: the plan line is printed with the progress
COMMANDS = {
    "scan": ["scan", "{model}", "--probes", "wiki", "--n", "64", "--probe-tokens", "64"],
    "scan, block by block": ["scan", "{model}", "--stream", "--probes", "wiki", "--n", "64", "--probe-tokens", "64"],
    "prune": ["prune", "{model}", "--scan", "{scan}", "--remove", "2", "--no-baselines", "--n-eval", "4",
              "--calibration", "4", "--max-tokens", "64"],
    "quantize, 6 widths": ["quantize", "{model}", "--scan", "{scan}", "--bits", "4.5", "--widths",
                           "MXFP4,Q4_0,Q4_1,Q5_0,Q5_1,Q8_0", "--no-baselines", "--no-curve", "--n-eval", "4",
                           "--calibration", "4", "--max-tokens", "64"],
    "quantize, 3 widths": ["quantize", "{model}", "--scan", "{scan}", "--bits", "4.5", "--widths", "Q4_0,Q5_0,Q8_0",
                           "--no-baselines", "--no-curve", "--n-eval", "4", "--calibration", "4", "--max-tokens",
                           "64"],
    "kv": ["kv", "{model}", "--scan", "{scan}", "--bits", "3", "--no-baselines", "--no-curve", "--n-eval", "2",
           "--calibration", "2", "--max-tokens", "512"],
    "tune, 4 fixed blocks": ["tune", "{model}", "--data", "wiki", "--layers", "6-9", "--steps", "10", "--batch-size",
                             "2", "--max-tokens", "64", "--n-eval", "4", "--eval-every", "10"],
    "tune, sample:4": ["tune", "{model}", "--data", "wiki", "--sample", "4", "--every", "2", "--steps", "10",
                       "--batch-size", "2", "--max-tokens", "64", "--n-eval", "4", "--eval-every", "10"],
}


def cpu_flags() -> str:
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    return " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags) or "unknown"


def build(shape: str, folder: Path) -> int:
    """The model of ``shape`` in ``folder`` (random weights in bfloat16, one safetensors file per block, written
    tensor by tensor so that no more than one block is ever in memory), with smollm2-135m's tokenizer; its
    parameters."""
    import critlayer
    from safetensors.torch import save_file

    family, sizes = SHAPES[shape]
    config = transformers.AutoConfig.for_model(family, max_position_embeddings=4096, dtype="bfloat16", **sizes)
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(config)
    if not (folder / "config.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        shards: dict[str, dict[str, torch.Size]] = {}
        for name, p in skeleton.named_parameters(remove_duplicate=True):
            block = re.search(r"\.layers\.(\d+)\.", name)
            shards.setdefault(f"block-{int(block.group(1)):03d}" if block else "outside", {})[name] = p.shape
        generator, where = torch.Generator().manual_seed(0), {}
        for shard, shapes in shards.items():
            tensors = {name: torch.ones(size, dtype=torch.bfloat16) if name.endswith("norm.weight") else
                       torch.empty(size, dtype=torch.bfloat16).normal_(0, 0.02, generator=generator)
                       for name, size in shapes.items()}
            save_file(tensors, folder / f"{shard}.safetensors", metadata={"format": "pt"})
            where |= dict.fromkeys(tensors, f"{shard}.safetensors")
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": where}))
        config.architectures = [type(skeleton).__name__]  # what loads it with its head
        config.save_pretrained(folder)
        critlayer.load("smollm2-135m").tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in skeleton.parameters())


def run(argv: list[str], log: Path) -> dict:
    """One command in a fresh process: its peak resident memory, wall time and the forward tokens it planned."""
    done = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "critlayer", *argv, *COMMON],
                          capture_output=True, text=True)
    log.write_text(done.stdout + done.stderr)
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", done.stderr).group(1)
    seconds = sum(float(part) * 60 ** i for i, part in enumerate(reversed(wall.split(":"))))
    planned = [int(m.group(1).replace(",", ""))
               for m in re.finditer(r"plans (?:at most )?([\d,]+) forward", done.stderr)]
    return {"exit": done.returncode, "peak_gb": round(peak * 1024 / 1e9, 2),  # /usr/bin/time reports KiB
            "seconds": round(seconds, 1), "planned_forward_tokens": planned[-1] if planned else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--commands", nargs="+", choices=list(COMMANDS),
                        help="default: every command but the block-by-block scan; that one alone on larger shapes")
    parser.add_argument("--out", type=Path, default=Path("bench-results/scale"))
    args = parser.parse_args()
    results = args.out / "scale.json"
    kept = json.loads(results.read_text())["runs"] if results.exists() else []
    rows = {(r["shape"], r["command"]): r for r in kept if r["command"] in COMMANDS}  # not rows of a retired command
    for shape in args.shapes:
        folder = args.out / shape
        parameters = build(shape, folder / "model")
        default = ["scan, block by block"] if shape in STREAMED else [c for c in COMMANDS if "block by block" not in c]
        for name in args.commands or default:
            argv = [a.format(model=folder / "model", scan=folder / "scan") for a in COMMANDS[name]]
            argv += ["--out", str(folder / ("scan" if name == "scan" else re.sub(r"\W+", "-", name)))]
            row = {"shape": shape, "parameters": parameters, "weights_gb_bfloat16": round(2 * parameters / 1e9, 2),
                   "command": name, **run(argv, folder / f"{re.sub(r'[^a-z0-9]+', '-', name)}.log")}
            rows[shape, name] = row
            print(json.dumps(row), flush=True)
    order = lambda item: (list(SHAPES).index(item[0][0]), list(COMMANDS).index(item[0][1]))  # noqa: E731
    rows = dict(sorted(rows.items(), key=order))
    table = ["| model | parameters | weights (bfloat16) | command | peak resident | peak / weights | wall | "
             "planned forward tokens | exit |", "|---|---|---|---|---|---|---|---|---|"]
    table += [f"| {r['shape']} | {r['parameters'] / 1e9:.2f} B | {r['weights_gb_bfloat16']} GB | {r['command']} | "
              f"{r['peak_gb']} GB | {r['peak_gb'] / r['weights_gb_bfloat16']:.1f} | {r['seconds']} s | "
              f"{'-' if r['planned_forward_tokens'] is None else format(r['planned_forward_tokens'], ',')} | "
              f"{r['exit']} |" for r in rows.values()]
    machine = {"cpu_flags": cpu_flags(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    results.write_text(json.dumps({"machine": machine, "runs": list(rows.values())}, indent=1))
    (args.out / "scale.txt").write_text("\n".join(table) + f"\n\n{machine}\n")
    plot(list(rows.values()), args.out / "scale.png", machine["cpu_flags"])
    print("\n".join(table))


def plot(rows: list[dict], path: Path, flags: str) -> None:
    """Peak resident memory over the weights, and wall time, against parameters: one line per command."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (memory, time) = plt.subplots(1, 2, figsize=(11, 4))
    for command in dict.fromkeys(r["command"] for r in rows):
        done = sorted((r for r in rows if r["command"] == command and r["exit"] == 0), key=lambda r: r["parameters"])
        sizes = [r["parameters"] / 1e9 for r in done]
        memory.plot(sizes, [r["peak_gb"] / r["weights_gb_bfloat16"] for r in done], "o-", label=command)
        time.plot(sizes, [r["seconds"] for r in done], "o-", label=command)
    sizes = sorted({r["parameters"] for r in rows})
    memory.plot([p / 1e9 for p in sizes], [1.5 + 1e9 / (2 * p) for p in sizes], "k--", label="1.5 × weights + 1 GB")
    memory.set(xscale="log", xlabel="parameters (billions)", ylabel="peak resident / bfloat16 weights",
               title="memory")
    time.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    time.set(xscale="log", yscale="log", xlabel="parameters (billions)", ylabel="wall seconds", title="time")
    for axis in (memory, time):
        axis.set_xticks([p / 1e9 for p in sizes], [f"{p / 1e9:.2g}" for p in sizes], minor=False)
        axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    memory.legend(fontsize=8)
    figure.suptitle(f"random-weight models, bfloat16, 2 threads ({flags})", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
