"""Options: a config field that is also a CLI flag, with its help and its limits written once, beside its default.

The CLI builds every command's flags from these fields (``cli.py``); the config checks the limits when it is made,
so the Python API refuses what the CLI refuses, in the same one line, before any work.
"""

from __future__ import annotations

import math
from dataclasses import Field, field, fields

from .errors import CritlayerError

SEED_HELP = "seed of everything the command draws at random"
DTYPE_HELP = ("what the model computes in: auto is bfloat16 on GPUs and CPUs with bfloat16 arithmetic (AVX-512 BF16, "
              "AMX), float32 elsewhere")


def option(default, help: str, *, minimum: float | None = None, below: float | None = None,
           positive: bool = False, choices: tuple | None = None, none: str | None = None, flag: str | None = None,
           old_flag: str | None = None):
    """A config field with what its CLI flag says and accepts: ``minimum`` (inclusive), ``below`` (exclusive),
    ``positive`` (a finite number above zero), ``choices``; ``none``: what a default of None means; ``flag`` where the flag is not the field's name
    (``--no-baselines`` for a switch that is on by default), ``old_flag`` a deprecated spelling still accepted."""
    meta = {"help": help, "minimum": minimum, "below": below, "positive": positive, "choices": choices,
            "none": none, "flag": flag, "old_flag": old_flag}
    return field(default=default, metadata=meta)


def override(config_class, name: str, default):
    """The option ``name`` of ``config_class`` with another default: a config that shares a field but not its
    default (defend's steps, quantize's calibration) keeps its help and limits."""
    return field(default=default, metadata=next(f for f in fields(config_class) if f.name == name).metadata)


def flag_of(f: Field) -> str:
    """The CLI flag of a config field."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def check_options(config) -> None:
    """Refuse, in one line, the first field of ``config`` outside its limits (None means unset)."""
    for f in fields(config):
        value, meta = getattr(config, f.name), f.metadata
        if value is None or "help" not in meta or isinstance(value, bool):
            continue
        name = flag_of(f).removeprefix("--no-")
        name = name if name.startswith("--") else "--" + name
        if meta["choices"] is not None and value not in meta["choices"]:
            raise CritlayerError(f"{name} takes one of {', '.join(map(str, meta['choices']))}, got {value!r}")
        if meta["positive"] and not (0 < value < math.inf):
            raise CritlayerError(f"{name} must be a positive number, got {value:g}")
        if meta["minimum"] is not None and value < meta["minimum"]:
            raise CritlayerError(f"{name} must be at least {meta['minimum']:g}, got {value:g}")
        if meta["below"] is not None and not value < meta["below"]:
            raise CritlayerError(f"{name} must be below {meta['below']:g}, got {value:g}")
