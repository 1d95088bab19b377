"""A scan's result: what it measured, which layers it chose and why, and how to save and reload it."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..common.errors import CritlayerError
from ..common.folders import SavedResult
from ..models.language_model import shape_difference
from .consensus import Consensus, measure_ranks
from .firmness import Firmness
from .measures import DIRECTION
from .probes import PROBE_FILE, Probes, tokenizer_fingerprint, write_probe_file
from .select import Selection, ranking_by


@dataclass
class ScanResult(SavedResult, file="scan.json", kind="scan"):
    """Per-layer scores of one model, the CKA matrix, and the chosen critical layers.

    ``scores`` maps a score name to one value per block (block i = index i), ``consensus`` and
    ``p_critical`` included; ``cka[i][j]`` is the linear CKA between the outputs of blocks i and j;
    ``selection`` says which blocks the rule chose from all the probes read, by which rule and why;
    ``firmness`` how often it chose each over halves of them and how often another scan would (firm is read
    from the latter where it is measured), and ``critical`` is the answer: the firm
    blocks (possibly none), or the rule's choice where firmness was not measured. ``consensus`` says how
    the scores were combined; ``probe_ids`` are the probes read (saved as probes.json, which ``--probes``
    takes back).
    """

    model: dict
    probes: dict
    layers: list[int]
    cka: np.ndarray | None
    scores: dict[str, np.ndarray]
    selection: Selection
    consensus: Consensus
    firmness: Firmness | None = None
    probe_ids: Probes | None = None
    measures: list[str] = field(default_factory=list)
    capture: dict = field(default_factory=dict)
    timing: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)

    @property
    def critical(self) -> list[int]:
        return self.selection.critical if self.firmness is None else self.firmness.firm

    def to_json(self) -> dict:
        return {
            "model": self.model, "probes": self.probes, "layers": self.layers,
            "cka": None if self.cka is None else np.round(self.cka, 8).tolist(),
            "scores": {name: np.round(values, 8).tolist() for name, values in self.scores.items()},
            "critical": self.critical,
            "firmness": None if self.firmness is None else self.firmness.to_json(),
            "selection": {**self.selection.to_json(), "measures": self.measures},
            "capture": self.capture, "consensus": self.consensus.to_json(), "timing": self.timing,
            "versions": self.versions,
        }

    @classmethod
    def from_json(cls, data: dict) -> "ScanResult":
        cka = data.get("cka")
        return cls(model=data["model"], probes=data["probes"], layers=data["layers"],
                   cka=None if cka is None else np.array(cka, dtype=float),
                   scores={k: np.array(v, dtype=float) for k, v in data["scores"].items()},
                   selection=Selection.from_json(data["selection"], len(data["layers"])),
                   consensus=Consensus.from_json(data.get("consensus", {})),
                   firmness=None if data.get("firmness") is None else Firmness.from_json(data["firmness"]),
                   measures=data["selection"].get("measures", []), capture=data.get("capture", {}),
                   timing=data.get("timing", {}), versions=data.get("versions", {}))

    def write_files(self, folder: Path) -> None:
        """layers.csv, the plots and report.html."""
        from ..report import write_report

        self.write_csv(folder / "layers.csv")
        if self.probe_ids is not None:
            write_probe_file(self.probe_ids, self.probes.get("tokenizer"), folder / PROBE_FILE)
        write_report(self, folder)

    def write_csv(self, path: Path) -> None:
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["layer", "critical", *self.scores])
            for i in self.layers:
                writer.writerow([i, int(i in self.critical), *(f"{v[i]:.6f}" for v in self.scores.values())])

    def require_layers(self, num_layers: int) -> None:
        """Refuse to apply this scan to a model with another number of blocks."""
        if self.model.get("num_layers") != num_layers:
            raise CritlayerError(f"the scan has {self.model.get('num_layers')} layers, the model {num_layers}")

    def require_model(self, lm) -> None:
        """Refuse to apply this scan to another model: another architecture, shape or tokenizer than it measured."""
        shape = shape_difference(self.model, lm.describe())
        tokenizer = self.probes.get("tokenizer")
        if shape or (tokenizer and tokenizer != tokenizer_fingerprint(lm)):
            what = shape or "tokenizer"
            raise CritlayerError(f"the scan was made on another model ({self.model.get('name')}: {what}) than "
                                 f"{lm.name}; scan this model or pass its own scan")

    @staticmethod
    def direction(score: str) -> int:
        """+1 when a high value of ``score`` marks a critical block, -1 when a low one does."""
        return DIRECTION.get(score, -1)

    def ranking(self, score: str | None = None, eligible: list[int] | None = None) -> list[int]:
        """Blocks from most to least critical by ``score`` (default: the selection's): ``eligible`` ones (default:
        the selection's) first, and by the selection's score firm blocks before tentative ones before the rest.
        Every use that orders blocks by a scan (layer specs, pruning, quantization) orders them here."""
        score = score or self.selection.score
        if score not in self.scores:
            raise CritlayerError(f"the scan has no score {score!r}; it has {', '.join(self.scores)}")
        ranked = ranking_by(self.scores, score, self.selection.eligible if eligible is None else eligible)
        if self.firmness is None or score != self.selection.score:
            return ranked
        tier = {**dict.fromkeys(self.firmness.tentative, 1), **dict.fromkeys(self.firmness.firm, 2)}
        return sorted(ranked, key=lambda block: -tier.get(block, 0))  # stable: by score within a tier

    def least_critical(self, score: str, eligible: list[int]) -> list[int]:
        """The ``eligible`` blocks alone, from least to most critical by ``score``."""
        allowed = set(eligible)  # firm blocks may come first whether eligible or not: keep the eligible alone
        return [block for block in self.ranking(score, eligible) if block in allowed][::-1]

    @property
    def cost(self) -> dict:
        """What the scan cost: seconds and forward tokens (generated probes are written one token at a time)."""
        tokens = int(round(self.probes.get("n", 0) * self.probes.get("mean_tokens", 0)))
        return {"seconds": round(self.timing.get("total", 0.0), 3), "forward_tokens": tokens}

    def measure_ranks(self) -> dict[str, np.ndarray]:
        """Each measure's criticality rank scaled to [0, 1], as the consensus averages them."""
        return measure_ranks(self.scores, self.consensus.groups)

    def answer(self) -> str:
        """The answer in a sentence: the firm blocks, or plainly that none is firm, and the tentative ones."""
        name, sel, firmness = self.model.get("name", "the model"), self.selection, self.firmness
        rule = f"rule {sel.rule}: {sel.reason}"
        if firmness is None:
            return f"critical layers of {name}: {self.critical}  ({rule})"
        p = firmness.chance
        tentative = ", ".join(f"{b} ({p[b]:.3f})" for b in firmness.tentative) or "none"
        doubtful = [b for b in firmness.undecided if b not in firmness.tentative]
        if doubtful:  # not the answer, but not settled either: another probe set may pick them
            share = f"{firmness.thresholds['absent']:.0%}-{firmness.thresholds['tentative']:.0%}"
            picked = f"another scan would pick in {share} of cases" if firmness.by_replication else f"picked in {share}"
            tentative += f"; {picked}: " + ", ".join(f"{b} ({p[b]:.3f})" for b in doubtful)
        where = (f"{len(firmness.rounds)} round(s), {firmness.rounds[-1].probes} probes; " if firmness.rounds else "")
        how = f"{where}{firmness.stopped}"
        firm = firmness.thresholds["firm"]
        meaning = (f"another scan of as many probes would pick each in >= {firm:.0%} of cases, from "
                   f"{firmness.replicates} halves of the probes" if firmness.by_replication else
                   f"picked in >= {firm:.0%} of {firmness.replicates} "
                   + ("halves of the probes" if firmness.score == "delta" else "bootstrap replicates"))
        if not firmness.firm:
            return (f"critical layers of {name}: no block is firm ({meaning}); tentative: {tentative}; the rule on all "
                    f"probes chose {sel.critical} ({how})")
        return f"critical layers of {name}: {firmness.firm}, firm ({meaning}); tentative: {tentative} ({how}; {rule})"

    def table(self) -> str:
        """A plain-text summary table, one row per layer."""
        names = list(self.scores)
        header = f"{'layer':>5}  " + "  ".join(f"{n:>16}" for n in names) + "  critical"
        lines = [header, "-" * len(header)]
        for i in self.layers:
            cells = "  ".join(f"{self.scores[n][i]:>16.4f}" for n in names)
            lines.append(f"{i:>5}  {cells}  {'*' if i in self.critical else ''}")
        return "\n".join(lines)
