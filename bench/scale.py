"""What a command costs at the sizes people run: peak resident memory, wall time and planned forward tokens.

Random-weight models built from the configurations of real families (the shape is what costs; random weights make
their answers mean nothing), with smollm2-135m's tokenizer, saved as bfloat16 safetensors as those families publish
their weights. Each command runs in a
fresh process under ``/usr/bin/time -v``, one after another, on the same machine:

  scan       the default measures on 64 wiki probes of 64 tokens (a fixed number: a random model never settles)
  prune      two blocks, the default score checked by the loss, no baselines
  quantize   4.5 bits, no baselines, no curve, with the family's widths and with three of them

    python bench/scale.py --shapes llama-3.2-1b --out bench-results/scale

Results: ``scale.json`` and ``scale.txt`` in ``--out`` (with the CPU's flags). The models are built once and kept in
``--out`` (bfloat16: 2 bytes a parameter on disk).
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
}
COMMON = ["--dtype", "bfloat16", "--force"]  # not --quiet: the plan line is printed with the progress
COMMANDS = {
    "scan": ["scan", "{model}", "--probes", "wiki", "--n", "64", "--probe-tokens", "64"],
    "prune": ["prune", "{model}", "--scan", "{scan}", "--remove", "2", "--no-baselines", "--n-eval", "4",
              "--calibration", "4", "--max-tokens", "64"],
    "quantize": ["quantize", "{model}", "--scan", "{scan}", "--bits", "4.5", "--no-baselines", "--no-curve",
                 "--n-eval", "4", "--calibration", "4", "--max-tokens", "64"],
    "quantize, 3 widths": ["quantize", "{model}", "--scan", "{scan}", "--bits", "4.5", "--widths", "Q4_0,Q5_0,Q8_0",
                           "--no-baselines", "--no-curve", "--n-eval", "4", "--calibration", "4", "--max-tokens",
                           "64"],
}


def cpu_flags() -> str:
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    return " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags) or "unknown"


def build(shape: str, folder: Path) -> int:
    """The model of ``shape``, random weights saved in bfloat16 with smollm2-135m's tokenizer; its parameters."""
    import critlayer

    family, sizes = SHAPES[shape]
    config = transformers.AutoConfig.for_model(family, max_position_embeddings=4096, **sizes)
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(folder)
        critlayer.load("smollm2-135m").tokenizer.save_pretrained(folder)
        del model
    with torch.device("meta"):
        return sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(config).parameters())


def run(argv: list[str], log: Path) -> dict:
    """One command in a fresh process: its peak resident memory, wall time and the forward tokens it planned."""
    done = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "critlayer", *argv, *COMMON],
                          capture_output=True, text=True)
    log.write_text(done.stdout + done.stderr)
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", done.stderr).group(1)
    seconds = sum(float(part) * 60 ** i for i, part in enumerate(reversed(wall.split(":"))))
    planned = [int(m.group(1).replace(",", "")) for m in re.finditer(r"plans (?:at most )?([\d,]+) forward", done.stderr)]
    return {"exit": done.returncode, "peak_gb": round(peak * 1024 / 1e9, 2),  # /usr/bin/time reports KiB
            "seconds": round(seconds, 1), "planned_forward_tokens": planned[-1] if planned else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--commands", nargs="+", default=list(COMMANDS), choices=list(COMMANDS))
    parser.add_argument("--out", type=Path, default=Path("bench-results/scale"))
    args = parser.parse_args()
    rows = []
    for shape in args.shapes:
        folder = args.out / shape
        parameters = build(shape, folder / "model")
        for name in args.commands:
            argv = [a.format(model=folder / "model", scan=folder / "scan") for a in COMMANDS[name]]
            argv += ["--out", str(folder / ("scan" if name == "scan" else re.sub(r"\W+", "-", name)))]
            row = {"shape": shape, "parameters": parameters, "weights_gb_bfloat16": round(2 * parameters / 1e9, 2),
                   "command": name, **run(argv, folder / f"{re.sub(r'[^a-z0-9]+', '-', name)}.log")}
            rows.append(row)
            print(json.dumps(row), flush=True)
    table = ["| model | parameters | weights (bfloat16) | command | peak resident | peak / weights | wall | "
             "planned forward tokens | exit |", "|---|---|---|---|---|---|---|---|---|"]
    table += [f"| {r['shape']} | {r['parameters'] / 1e9:.2f} B | {r['weights_gb_bfloat16']} GB | {r['command']} | "
              f"{r['peak_gb']} GB | {r['peak_gb'] / r['weights_gb_bfloat16']:.1f} | {r['seconds']} s | "
              f"{'-' if r['planned_forward_tokens'] is None else format(r['planned_forward_tokens'], ',')} | "
              f"{r['exit']} |" for r in rows]
    machine = {"cpu_flags": cpu_flags(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    (args.out / "scale.json").write_text(json.dumps({"machine": machine, "runs": rows}, indent=1))
    (args.out / "scale.txt").write_text("\n".join(table) + f"\n\n{machine}\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
