"""A scan's result: what it measured, which layers it chose, and how to save and reload it."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import CritlayerError
from .outputs import check_output_folder, staged_folder

SCAN_FILE = "scan.json"


@dataclass
class ScanResult:
    """Per-layer scores of one model, the CKA matrix, and the chosen critical layers.

    ``scores`` maps a score name to one value per block (block i = index i), ``consensus`` and
    ``p_critical`` included; ``cka[i][j]`` is the linear CKA between the outputs of blocks i and j;
    ``consensus`` says which scores the consensus combines, their pairwise agreement and the bootstrap.
    """

    model: dict
    probes: dict
    layers: list[int]
    cka: np.ndarray | None
    scores: dict[str, np.ndarray]
    critical: list[int]
    selection: dict
    timing: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    capture: dict = field(default_factory=dict)
    consensus: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "model": self.model, "probes": self.probes, "layers": self.layers,
            "cka": None if self.cka is None else np.round(self.cka, 8).tolist(),
            "scores": {name: np.round(values, 8).tolist() for name, values in self.scores.items()},
            "critical": self.critical, "selection": self.selection, "capture": self.capture,
            "consensus": self.consensus,
            "timing": self.timing, "versions": self.versions,
        }

    @classmethod
    def from_json(cls, data: dict) -> "ScanResult":
        cka = data.get("cka")
        return cls(model=data["model"], probes=data["probes"], layers=data["layers"],
                   cka=None if cka is None else np.array(cka, dtype=float),
                   scores={k: np.array(v, dtype=float) for k, v in data["scores"].items()},
                   critical=data["critical"], selection=data["selection"], timing=data.get("timing", {}),
                   versions=data.get("versions", {}), capture=data.get("capture", {}),
                   consensus=data.get("consensus", {}))

    def save(self, folder: str | Path, *, force: bool = False, report: bool = True) -> Path:
        """Write scan.json, layers.csv and (with ``report``) the plots and report.html, atomically."""
        folder = Path(folder)
        check_output_folder(folder, SCAN_FILE, force)
        with staged_folder(folder) as tmp:
            (tmp / SCAN_FILE).write_text(json.dumps(self.to_json(), indent=1))
            self.write_csv(tmp / "layers.csv")
            if report:
                from .report import write_report
                write_report(self, tmp)
        return folder

    def write_csv(self, path: Path) -> None:
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["layer", "critical", *self.scores])
            for i in self.layers:
                writer.writerow([i, int(i in self.critical), *(f"{v[i]:.6f}" for v in self.scores.values())])

    @classmethod
    def load(cls, path: str | Path) -> "ScanResult":
        """Reload a result from its folder or its scan.json."""
        path = Path(path)
        file = path / SCAN_FILE if path.is_dir() else path
        if not file.is_file():
            raise CritlayerError(f"no scan found at {path}")
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise TypeError("not a JSON object")
            return cls.from_json(data)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # JSON and Unicode errors are ValueErrors
            raise CritlayerError(f"{file} is not a critlayer scan: {exc}") from None

    def require_layers(self, num_layers: int) -> None:
        """Refuse to apply this scan to a model with another number of blocks."""
        if self.model.get("num_layers") != num_layers:
            raise CritlayerError(f"the scan has {self.model.get('num_layers')} layers, the model {num_layers}")

    def ranking(self, score: str | None = None) -> list[int]:
        """Blocks from most to least critical by ``score`` (default: the selection's): eligible ones first."""
        from .measures import DIRECTION
        from .select import rank_blocks

        score = score or self.selection.get("score", "delta")
        if score not in self.scores:
            raise CritlayerError(f"the scan has no score {score!r}; it has {', '.join(self.scores)}")
        eligible = self.selection.get("params", {}).get("eligible", self.layers)
        return rank_blocks(DIRECTION.get(score, -1) * np.asarray(self.scores[score]), eligible)

    def blocks(self, spec: str | None = None, score: str | None = None, seed: int = 0) -> list[int]:
        """The critical blocks, or those a layer spec names (``critical:K`` ranked by ``score``)."""
        from .layers import parse_layers

        if spec is None:
            return list(self.critical)
        ranking = self.ranking(score)
        eligible = len(self.selection.get("params", {}).get("eligible", ranking))
        return parse_layers(spec, len(self.layers), ranking=ranking, eligible=eligible, seed=seed)

    def table(self) -> str:
        """A plain-text summary table, one row per layer."""
        names = list(self.scores)
        header = f"{'layer':>5}  " + "  ".join(f"{n:>16}" for n in names) + "  critical"
        lines = [header, "-" * len(header)]
        for i in self.layers:
            cells = "  ".join(f"{self.scores[n][i]:>16.4f}" for n in names)
            lines.append(f"{i:>5}  {cells}  {'*' if i in self.critical else ''}")
        return "\n".join(lines)
