"""What a long command will cost, said before it starts: the tokens it runs forward, phase by phase.

A phase is a number of passes over one text set (probes, calibration or held-out text, training batches); its
forward tokens are the passes times the tokens of that set. A training step counts its tokens once (its backward
costs about twice as much again). Where a phase's size depends on what earlier phases find (a scan that may stop
early, methods that may agree), the plan gives the most it can take, and says so.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from .distributed import is_main


@dataclass
class Phase:
    """Forward tokens in so many passes over a text set (or training steps), and whether that is the most."""

    tokens: int = 0
    count: int = 0
    unit: str = "pass"
    at_most: bool = False

    def __str__(self) -> str:
        plural = self.unit + ("es" if self.unit.endswith("s") else "s")
        return (f"{'at most ' if self.at_most else ''}{self.tokens:,} in {self.count:,} "
                f"{self.unit if self.count == 1 else plural}")


@dataclass
class Plan:
    """The work a command plans, phase by phase."""

    command: str
    phases: dict[str, Phase] = field(default_factory=dict)

    def add(self, phase: str, passes: int, tokens_per_pass: int, *, at_most: bool = False) -> "Plan":
        """``passes`` over a text set of ``tokens_per_pass`` tokens, added to the phase of that name."""
        return self.add_tokens(phase, passes, passes * tokens_per_pass, at_most=at_most)

    def add_tokens(self, phase: str, count: int, tokens: int, *, unit: str = "pass", at_most: bool = False) -> "Plan":
        """``tokens`` in ``count`` passes (or training steps: ``unit``), added to the phase of that name."""
        known = self.phases.setdefault(phase, Phase(unit=unit))
        known.tokens, known.count, known.at_most = known.tokens + tokens, known.count + count, known.at_most or at_most
        return self

    @property
    def forward_tokens(self) -> int:
        return sum(phase.tokens for phase in self.phases.values())

    def line(self) -> str:
        bound = "at most " if any(phase.at_most for phase in self.phases.values()) else ""
        parts = "; ".join(f"{name} {phase}" for name, phase in self.phases.items())
        return f"critlayer: {self.command} plans {bound}{self.forward_tokens:,} forward tokens ({parts})"

    def announce(self, progress: bool = True) -> "Plan":
        """Print the plan (main process; not with progress off, nor when nothing runs forward)."""
        if progress and is_main() and self.phases:
            print(self.line(), file=sys.stderr, flush=True)
        return self
