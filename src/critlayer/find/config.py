"""What a scan is asked: one object, checked before any work is spent (each field is the CLI flag of that name)."""

from __future__ import annotations

from dataclasses import dataclass

from ..common.errors import CritlayerError, require_at_least
from ..models.surgery import parse_parts
from .capture import BATCH_SIZE, SINK_RATIO, TOKEN_MODES
from .measures import CAPTURE, DEFAULT_MEASURES, MEASURES, TEXT, parse_measures
from .firmness import MAX_PROBES, MIN_PROBES
from .probes import Probes

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

    probes: str | Probes = "generated"
    n: int | None = None
    max_n: int = MAX_PROBES
    max_tokens: int = 64
    seed: int = 0
    chat_template: bool = False
    # Every token but position 0 and massive activations: on smollm2-135m about 60 rows per generated probe where
    # the last token gives one; 21-23 came out firm after 128 probes (seeds 0-2, float32 and bfloat16), the last
    # token needed over 400 (measured with firmness by halves, before the sink filter cut at 3x).
    token_mode: str = "all"
    window: int = 2
    measures: str | tuple[str, ...] = "default"
    data: str | None = None
    text_n: int = 32
    ablate: str | tuple[str, ...] = "block"
    bootstrap: int | None = None
    k: int | None = None
    edges: bool = False
    score: str | None = None
    batch_size: int = BATCH_SIZE
    max_rows: int = 2048
    sink_ratio: float = SINK_RATIO

    def __post_init__(self):
        self.measures = parse_measures(self.measures)
        self.ablate = parse_parts(self.ablate)
        if self.bootstrap is None:
            self.bootstrap = 0 if set(self.measures) <= set(DEFAULT_MEASURES) else BOOTSTRAP
        if self.token_mode not in TOKEN_MODES:
            raise CritlayerError(f"unknown token mode {self.token_mode!r}; choose one of {', '.join(TOKEN_MODES)}")
        require_at_least(self, n=4, max_n=MIN_PROBES, max_tokens=2, seed=0, window=1, text_n=2, bootstrap=0,
                         batch_size=1, max_rows=2, k=1)
        if self.sink_ratio < 0:
            raise CritlayerError(f"--sink-ratio must be 0 (off) or positive, got {self.sink_ratio}")
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
