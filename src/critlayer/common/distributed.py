"""Several processes (``accelerate launch``): which one is the main one, and work done once and shared.

critlayer's training runs on accelerate, so ``accelerate launch -m critlayer tune ...`` trains on several
processes or GPUs with the user's accelerate configuration. Everything else runs alike in every process
(each evaluates on its own copy of the weights, with no collective, so no process ever waits on another
that does not evaluate); only the main process prints and writes. Work that must happen once, such as a
scan that ranks the blocks, runs on the main process and is handed to the others, and an error there
ends every process with the same one line.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import nullcontext
from functools import lru_cache
from typing import TypeVar

import torch

from .errors import CritlayerError, first_line

T = TypeVar("T")
# How launchers (torchrun, mpirun) tell a process how many there are.
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launched() -> bool:
    """Whether a launcher started several processes (asked without importing accelerate)."""
    return any(int(os.environ.get(name, "1")) > 1 for name in WORLD_SIZE_VARIABLES)


@lru_cache(maxsize=None)
def state():
    """accelerate's view of this process; on a machine without GPUs the processes talk over gloo."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


@lru_cache(maxsize=None)
def accelerator():
    """The one ``Accelerator`` of this process (it reads the user's ``accelerate config``)."""
    from accelerate import Accelerator

    state()
    return Accelerator(cpu=not torch.cuda.is_available())


def processes() -> int:
    return state().num_processes if launched() else 1


def is_main() -> bool:
    return state().is_main_process if launched() else True


def main_first():
    """A context in which the main process goes first (fetching and converting a model once, say)."""
    return state().main_process_first() if launched() else nullcontext()


def on_main(work: Callable[[], T]) -> T:
    """``work()`` run on the main process only, its result handed to every process; an error there is
    raised in every process, so none is left waiting."""
    if processes() == 1:
        return work()
    from accelerate.utils import broadcast_object_list

    if is_main():
        try:
            result = work()
        except Exception as error:  # every process must learn of it before this one stops
            broadcast_object_list([("failed", first_line(error))])
            raise
        broadcast_object_list([("done", result)])
        return result
    outcome: list = [None]
    broadcast_object_list(outcome)
    kind, value = outcome[0]
    if kind == "failed":
        raise CritlayerError(value)
    return value


def finish() -> None:
    """End a run on several processes together: every process waits for the others, then closes the process
    group: a process that exits while its gloo group still runs threads is aborted now and then ("terminate called
    without an active exception")."""
    if processes() > 1 and torch.distributed.is_initialized():
        try:
            state().wait_for_everyone()
        finally:
            torch.distributed.destroy_process_group()


def gather(value: T) -> list[T]:
    """``value`` from every process, in process order (one element when there is one process)."""
    if processes() == 1:
        return [value]
    from accelerate.utils import gather_object

    return gather_object([value])
