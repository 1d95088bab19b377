"""What a scan is asked: one object, checked before any work is spent (each field is the CLI flag of that name)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..common.errors import CritlayerError
from ..common.options import SEED_HELP, check_options, option
from ..data.text import check_source
from ..models.surgery import parse_parts
from .capture import BATCH_SIZE, SINK_RATIO, TOKEN_MODES
from .measures import CAPTURE, DEFAULT_MEASURES, MEASURES, TEXT, parse_measures
from .firmness import MAX_PROBES, MIN_PROBES, ROUND
from .probes import SOURCES, Probes

FIXED_N = 256  # probes when n is not given and the answer's firmness is not measured in rounds
BOOTSTRAP = 100  # replicates; each recomputes the capture measures (mostly spectral's eigendecompositions) and ablation


@dataclass
class ScanConfig:
    """A scan's settings.

    ``probes``: generated, random, wiki, bbc, sharegpt, a .txt/.jsonl file, a probes.json a scan wrote, or a
    ``Probes`` object; ``n`` of them (None: in rounds until the answer is firm, at most ``max_n``; see
    ``find.firmness``), at most ``max_tokens`` each, drawn with ``seed`` (and wrapped in the chat template
    with ``chat_template``). ``token_mode``: which tokens' states are compared (all, last, mean). ``window``:
    delta averages CKA over blocks within it. ``measures``: default, all or a comma list; ``data`` and
    ``text_n``: the text the loss measures read (default the first probes); ``ablate``: block, attn, mlp.
    ``bootstrap``: replicates for P(critical) (default 100 when more than the default measures run, else 0).
    ``k``: exactly k critical blocks instead of the band rule; ``edges``: the first and last ``window``
    blocks may be chosen; ``score``: the score the selection ranks by (default delta, else the
    consensus). ``batch_size``: probes per forward; ``max_rows``: rows kept for CKA and spectra;
    ``sink_ratio``: tokens above this multiple of the layer's median norm are dropped (0 keeps all).
    """

    probes: str | Probes = option("generated", f"{', '.join(SOURCES)}, a .txt/.jsonl file, or a probes.json a scan "
                                                "wrote")
    n: int | None = option(None, f"number of probes (default: rounds of {ROUND} until the answer is firm, at most "
                                 "--max-n)", minimum=4)
    max_n: int = option(MAX_PROBES, "most probes a scan without --n reads", minimum=MIN_PROBES)
    max_tokens: int = option(64, "tokens per probe at most", minimum=2, flag="--probe-tokens", old_flag="--max-tokens")
    seed: int = option(0, SEED_HELP, minimum=0)
    chat_template: bool = option(False, "wrap text probes in the model's chat template")
    token_mode: str = option("all", "all tokens but attention sinks, the last token (the paper's), or their mean",
                             choices=TOKEN_MODES)
    window: int = option(2, "delta averages CKA over |j - l| <= window", minimum=1)
    measures: str | tuple[str, ...] = option("default", f"comma list of {', '.join(MEASURES)}; default "
                                                        "(cka,influence,spectral: no task data, one pass) or all")
    data: str | None = option(None, "text for ablation and gradient: wiki, bbc, sharegpt or a .txt/.jsonl file "
                                    "(default: the probes, unless random)")
    text_n: int = option(32, "texts ablation and gradient read", minimum=2)
    ablate: str | tuple[str, ...] = option("block", "what ablation skips: comma list of block, attn, mlp")
    bootstrap: int | None = option(None, f"bootstrap replicates over probe samples for P(critical) (default {BOOTSTRAP} "
                                         "with more than the default measures, else 0)", minimum=0)
    k: int | None = option(None, "choose exactly K critical layers (default: the band rule)", minimum=1)
    edges: bool = option(False, "let the selection pick the first and last --window blocks")
    score: str | None = option(None, "the score the selection ranks by, e.g. consensus or p_critical (default delta, "
                                     "else consensus)")
    batch_size: int = option(BATCH_SIZE, "probes per forward", minimum=1)
    max_rows: int = option(2048, "rows kept for CKA and spectra", minimum=2)
    sink_ratio: float = option(SINK_RATIO, "drop tokens whose norm exceeds this multiple of the layer median (0 keeps "
                                           "all)", minimum=0)

    def __post_init__(self):
        self.measures = parse_measures(self.measures)
        self.ablate = parse_parts(self.ablate)
        if self.bootstrap is None:
            self.bootstrap = 0 if set(self.measures) <= set(DEFAULT_MEASURES) else BOOTSTRAP
        check_options(self)
        if self.data is not None:
            check_source(self.data, 2)
        if isinstance(self.probes, str) and Path(self.probes).suffix in (".txt", ".jsonl"):
            check_source(self.probes, 1)
        self._check_text_source()

    @property
    def probe_source(self) -> str:
        return self.probes if isinstance(self.probes, str) else self.probes.source

    @property
    def selects_by_delta(self) -> bool:
        """Whether the selection is by delta, whose firmness is measured over halves of the probes."""
        return self.score in (None, "delta") and "cka" in self.measures

    @property
    def adaptive(self) -> bool:
        """Whether probes are read in rounds until the answer is firm: no fixed ``n``, and the selection by delta."""
        return self.n is None and self.selects_by_delta

    @property
    def probe_count(self) -> int:
        """The most probes the scan may read."""
        return self.n if self.n is not None else (self.max_n if self.adaptive else FIXED_N)

    @property
    def needs_text(self) -> list[str]:
        """The measures that need text with real next tokens."""
        return [m for m in self.measures if MEASURES[m].reads == TEXT]

    @property
    def needs_probes(self) -> bool:
        """Whether probes are read: by the capture measures, or by the loss measures when no --data is given."""
        return any(MEASURES[m].reads == CAPTURE for m in self.measures) or (bool(self.needs_text) and self.data is None)

    def _check_text_source(self) -> None:
        """Refuse a loss measure without real text, and --data that nothing reads."""
        if self.data is not None and not self.needs_text:
            readers = ", ".join(m for m in MEASURES if MEASURES[m].reads == TEXT)
            raise CritlayerError(f"--data is only read by {readers}; none of them is in --measures")
        if self.needs_text and self.data is None and self.probe_source == "random":
            raise CritlayerError(f"{', '.join(self.needs_text)} need text with real next tokens and random probes "
                                 "have none; give --data (wiki, bbc, sharegpt or a file) or text probes")
