"""Capture the residual stream after every block, at the tokens a token mode selects, round by round.

The hidden states come from one of three places: a forward over probes whose token ids are known
(``models.running``), the same block by block from disk (``models.stream``), or the model writing its own
probes (``find.sampler``), which sees every block output as each token goes through, so that generated
probes cost one pass. Each hidden state is reduced at once to the token mode's rows' norms and the block's
input/output dot products (turned into cosines once the last block has run); rows are kept whole only
while their key is among the ``max_rows`` smallest seen so far (the ``RowSample``), so no batch's hidden
states outlive it. Probes arrive in rounds of consecutive indices, so the first ``n`` probes of a long
scan are exactly those of a scan of ``n``, and nothing about a probe (its length, say) decides when it is
seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..common.errors import CritlayerError
from ..common.hashing import ROWS, uniform
from ..models import LanguageModel, running
from ..models.stream import stream_blocks
from .measures.rows import Batch, RowSample
from .probes import Probes
from .sampler import BATCH_SIZE as WRITING_BATCH
from .sampler import write_probes

TOKEN_MODES = ("last", "all", "mean")
# A token whose norm exceeds this multiple of its layer's median (in any block) is a massive-activation token.
# Ordinary tokens stay well under it and the massive ones form a cluster of their own above it, so the cut lies in
# the gap between them. A cut inside the cluster would keep a varying number of its members in each sample, and
# those few rows, weighted by their squared norm in the Grams, would set the depth of a valley, so that a block
# could be firm with one probe set and not with another. The measured ratios: docs/method/scan.md.
SINK_RATIO = 3.0
# The medians that ratio refers to come from the rows of the first probes by index, so the filter depends
# neither on batch size nor on how many probes a scan reads.
REFERENCE_SAMPLES = 32
# Probes per forward. On a CPU, batches of 16 short probes ran faster than 32, with less peak memory
# (docs/performance.md); on a GPU a larger batch may pay.
BATCH_SIZE = 16
# Batch widths are rounded up to a multiple of this. oneDNN keeps kernels per input shape, so a forward over
# many widths holds more memory; rounding costs little padding (measured in docs/method/scan.md, under CKA).
WIDTH_STEP = 8
COSINE_EPS = 1e-8  # a row norm below this counts as this, as in torch.nn.functional.cosine_similarity


@dataclass
class CaptureStats:
    samples: int = 0
    rows: int = 0
    sinks_dropped: int = 0
    too_short: int = 0
    tokens: int = 0

    def as_dict(self) -> dict:
        return {"samples": self.samples, "rows": self.rows, "tokens": self.tokens,
                "sinks_dropped": self.sinks_dropped, "too_short": self.too_short}


def row_keys(seed: int, probes: np.ndarray, positions: np.ndarray) -> torch.Tensor:
    """Each row's key in [0, 1): a hash of (seed, probe, position)."""
    return uniform(seed, ROWS, probes, positions)


class _Rows:
    """One batch's token-mode rows as its hidden states go by: every layer's row norms and every block's
    input/output cosines, and whole rows only at ``kept`` (all of them when ``kept`` is None).

    The results are allocated before the forward and filled in place: small tensors created during
    it and kept after it pin the allocator's heap and can cost hundreds of MB of resident memory.
    A block's cosines are the dot products of its input and output rows until the last block, then
    divided by the norms of both at once.
    """

    def __init__(self, lm: LanguageModel, flat: torch.Tensor, probes: np.ndarray, keys: torch.Tensor,
                 kept: torch.Tensor | None):
        self.flat, self.probes, self.keys, self.kept = flat, probes, keys, kept
        layers, rows, device = lm.num_layers + 1, len(flat), flat.device
        self.norms = torch.empty(layers, rows, device=device)
        self.cosines = torch.empty(layers - 1, rows, device=device)
        self.states = torch.empty(layers, rows if kept is None else len(kept), lm.hidden_size,
                                  dtype=torch.float32 if kept is None else kept_dtype(lm), device=device)
        self.added = 0
        self.previous: torch.Tensor | None = None

    def add(self, hidden: torch.Tensor) -> None:
        rows, layer = _take(hidden, self.flat), self.added
        torch.linalg.vector_norm(rows, dim=-1, out=self.norms[layer])
        if layer:
            torch.linalg.vecdot(self.previous, rows, out=self.cosines[layer - 1])
        self.states[layer] = rows if self.kept is None else rows[self.kept]
        self.previous, self.added = rows, layer + 1
        if self.added == len(self.norms):
            self.previous = None
            norms = self.norms.clamp(min=COSINE_EPS)
            self.cosines.div_(norms[:-1]).div_(norms[1:])


class Capture:
    """Capture probes round by round: ``round(first, stop)`` yields what each batch of probes ``first`` ..
    ``stop - 1`` leaves (see ``Batch``), and fills ``sample``, the rows kept whole.

    ``probes`` holds known token ids; without them the model writes its probes (``max_tokens`` at most,
    drawn with ``seed``) while they are captured, and ``token_ids`` collects them. Token modes: ``last``
    takes the last token of each probe; ``all`` every token but position 0 (an attention sink); ``mean`` the
    mean over the same tokens as ``all``. In every mode, massive-activation tokens (norm above ``sink_ratio``
    times the layer's median row norm over probes 0 .. ``REFERENCE_SAMPLES - 1``, at any layer; 0 disables)
    are dropped and counted. Within a round, known probes run in batches sorted by length, to spend little
    on padding.
    """

    def __init__(self, lm: LanguageModel, probes: Probes | None = None, *, token_mode: str = "last",
                 batch_size: int = BATCH_SIZE, seed: int = 0, sink_ratio: float = SINK_RATIO,
                 max_rows: int = 2048, max_tokens: int = 64, progress: bool = True):
        if token_mode not in TOKEN_MODES:
            raise CritlayerError(f"unknown token mode {token_mode!r}; choose one of {', '.join(TOKEN_MODES)}")
        if batch_size < 1:
            raise CritlayerError(f"batch size must be at least 1, got {batch_size}")
        if lm.streamed and token_mode == "mean":
            raise CritlayerError("block-by-block mode keeps every token of every batch for the mean; "
                                 "use --token-mode last or all with it")
        self.lm, self.token_mode, self.batch_size = lm, token_mode, batch_size
        self.seed, self.sink_ratio, self.max_tokens, self.progress = seed, sink_ratio, max_tokens, progress
        self.stats = CaptureStats()
        self.sample = RowSample(max_rows)
        self.written = probes is None
        self.token_ids: list[list[int]] = [] if probes is None else probes.token_ids
        self.pending: list[_Rows] = []
        self.reference: torch.Tensor | None = None
        if probes is not None:
            self.check_variety(len(probes))

    def check_variety(self, stop: int) -> None:
        """Refuse probes ``0 .. stop - 1`` when too few are long enough or their rows cannot differ."""
        usable = [ids for ids in self.token_ids[:stop] if len(ids) >= 2]
        if len(usable) < 2:
            raise CritlayerError(f"sequences too short: {len(usable)} of {stop} probes have 2 tokens "
                                 "(position 0 is an attention sink and never measured); need 2 such probes")
        if not rows_can_differ(usable):
            raise CritlayerError("the probes are identical, so every block gives each of them the same output; "
                                 "use more varied probes")

    def __iter__(self) -> Iterator[Batch]:
        """Every known probe, in one round."""
        return self.round(0, len(self.token_ids))

    def round(self, first: int, stop: int) -> Iterator[Batch]:
        """The batches of probes ``first`` .. ``stop - 1``; a massive-activation reference not yet complete when the
        round ends is taken from what has been seen."""
        reference_stop = min(stop, REFERENCE_SAMPLES)
        for rows, mask in (self._written if self.written else self._forward)(first, stop):
            self.pending.append(rows)
            self.stats.samples += mask.shape[0]
            self.stats.tokens += int(mask.sum())
            seen = sum(int((held.probes < reference_stop).sum()) for held in self.pending)
            if self.sink_ratio > 0 and self.reference is None and seen < reference_stop:
                continue  # hold batches until the reference probes have been seen
            yield from self._flush()
        yield from self._flush()

    def _flush(self) -> Iterator[Batch]:
        if self.pending and self.sink_ratio > 0 and self.reference is None:
            self.reference = self._reference_norms(self.pending)
        for held in self.pending:
            batch = self._finish(held)
            self.stats.rows += batch.cosines.shape[1]
            self.sample.update(batch)
            yield batch
        self.pending = []

    def _forward(self, first: int, stop: int) -> Iterator[tuple[_Rows, torch.Tensor]]:
        """Per batch of known probes, its rows (``_Rows``, every layer added) and its mask."""
        lm = self.lm
        self.stats.too_short += sum(len(ids) < 2 for ids in self.token_ids[first:stop])
        order = sorted((i for i in range(first, stop) if len(self.token_ids[i]) >= 2),
                       key=lambda i: (-len(self.token_ids[i]), i))
        batches = [(probes, *self._pad(probes)) for probes in
                   (np.array(order[i:i + self.batch_size]) for i in range(0, len(order), self.batch_size))]
        if lm.streamed:
            collected = [self._rows(mask, probes) for probes, _, mask in batches]
            with torch.inference_mode():
                stream_blocks(lm, [(ids, mask) for _, ids, mask in batches],
                              lambda hidden, b: collected[b].add(hidden), progress=self.progress)
            for _, _, mask in batches:
                yield collected.pop(0), mask
            return
        total = sum(len(self.token_ids[i]) for i in order)
        bar = tqdm(total=total, desc=f"capturing {lm.num_layers} blocks", unit="tok", disable=not self.progress)
        current: list[_Rows] = []  # the batch in flight
        with running.watching(lm, lambda hidden: current[0].add(hidden)), torch.inference_mode(), bar:
            for probes, ids, mask in batches:
                current[:] = [self._rows(mask, probes)]
                running.forward_blocks(lm, ids, mask)
                if current[0].added != lm.num_layers + 1:
                    raise CritlayerError(f"captured {current[0].added} hidden states, expected {lm.num_layers + 1}")
                bar.update(int(mask.sum()))
                yield current.pop(), mask

    def _written(self, first: int, stop: int) -> Iterator[tuple[_Rows, torch.Tensor]]:
        """Per batch of probes the model writes now, their rows and mask: the block outputs of every token are
        kept as it goes through (in ``last`` mode only each probe's latest), then reduced like a forward's."""
        bar = tqdm(total=stop - first, desc="writing and capturing probes", unit="probe", disable=not self.progress)
        with bar:
            for begin in range(first, stop, WRITING_BATCH):
                probes = np.arange(begin, min(stop, begin + WRITING_BATCH))
                states = _States(self.lm, len(probes), self.max_tokens, latest_only=self.token_mode == "last")
                written = write_probes(self.lm, probes, self.max_tokens, self.seed, states.add)
                self.token_ids.extend(written)
                lengths = torch.tensor([len(ids) for ids in written])
                mask = (torch.arange(self.max_tokens)[None, :] < lengths[:, None]).long()
                if self.token_mode == "last":
                    rows = self._rows(torch.ones(len(probes), 1, dtype=torch.long), probes, positions=lengths - 1)
                else:
                    rows = self._rows(mask[:, :int(lengths.max())], probes)
                for hidden in states.hidden(int(lengths.max())):
                    rows.add(hidden)
                bar.update(len(probes))
                yield rows, mask

    def _pad(self, probes: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return padded_batch([self.token_ids[i] for i in probes], self.lm.device,
                            getattr(self.lm.config, "max_position_embeddings", None))

    def _rows(self, mask: torch.Tensor, probes: np.ndarray, positions: torch.Tensor | None = None) -> _Rows:
        """A batch's token-mode tokens (flat ``row * width + position`` indices), keyed, and which to keep whole.
        ``positions`` are the last tokens' positions when each row's hidden state holds that token alone."""
        batch, width = mask.shape
        mask = mask.to(self.lm.device)
        if self.token_mode == "last":
            flat = torch.arange(batch, device=mask.device) * width + mask.sum(1) - 1
        else:
            keep = mask.bool().clone()
            keep[:, 0] = False  # position 0 is an attention sink in every model we measured
            flat = keep.flatten().nonzero().squeeze(1)
        row_probe = probes[(flat // width).cpu().numpy()]
        row_position = (flat % width).cpu().numpy() if positions is None else positions.numpy()
        keys = row_keys(self.seed, row_probe, row_position)
        kept = None if self.token_mode == "mean" else self._in_sample(keys).nonzero().squeeze(1).to(mask.device)
        return _Rows(self.lm, flat, row_probe, keys, kept)

    def _in_sample(self, keys: torch.Tensor) -> torch.Tensor:
        return keys < self.sample.threshold()

    def _reference_norms(self, pending: list[_Rows]) -> torch.Tensor:
        """Per-layer median row norm over the reference probes (the first ones by index)."""
        reference = min(REFERENCE_SAMPLES, 1 + max(int(rows.probes.max()) for rows in pending))
        norms = [rows.norms[:, torch.from_numpy(rows.probes < reference).to(rows.norms.device)] for rows in pending]
        return torch.cat(norms, dim=1).median(dim=1, keepdim=True).values

    def _finish(self, rows: _Rows) -> Batch:
        """Drop massive-activation rows and average per probe in ``mean`` mode."""
        cosines, states = rows.cosines, rows.states
        sinks = torch.zeros(cosines.shape[1], dtype=torch.bool, device=cosines.device)
        if self.sink_ratio > 0:
            sinks = (rows.norms > self.sink_ratio * self.reference).any(0)
            self.stats.sinks_dropped += int(sinks.sum())
        if self.token_mode == "mean":
            states, probes = self._mean_per_probe(states[:, ~sinks], rows.probes[(~sinks).cpu().numpy()])
            keys = row_keys(self.seed, probes, np.zeros_like(probes))
            cosines = torch.nn.functional.cosine_similarity(states[:-1], states[1:], dim=-1)
            kept = self._in_sample(keys)
            return Batch(states[:, kept.to(states.device)], keys[kept], probes[kept.numpy()], cosines)
        whole = ~sinks[rows.kept]
        kept = rows.kept[whole].cpu().numpy()
        return Batch(states[:, whole], rows.keys[kept], rows.probes[kept], cosines[:, ~sinks])

    @staticmethod
    def _mean_per_probe(rows: torch.Tensor, row_probe: np.ndarray):
        """Per probe (in the order they come), the mean of its rows."""
        probes, first, index = np.unique(row_probe, return_index=True, return_inverse=True)
        order = np.argsort(first)
        index = torch.from_numpy(np.argsort(order)[index]).to(rows.device)
        sums = torch.zeros(rows.shape[0], len(probes), rows.shape[2], device=rows.device).index_add_(1, index, rows)
        counts = torch.bincount(index, minlength=len(probes)).to(rows.dtype)
        return sums / counts[None, :, None], probes[order]


class _States:
    """The block outputs of a batch of probes being written, step by step: every position's, or (``latest_only``)
    each live row's latest, which is its last token's once the row has ended."""

    def __init__(self, lm: LanguageModel, rows: int, max_tokens: int, latest_only: bool):
        shape = (lm.num_layers + 1, rows, 1 if latest_only else max_tokens, lm.hidden_size)
        self.values = torch.zeros(shape, dtype=lm.dtype, device=lm.device)
        self.latest_only = latest_only

    def add(self, position: int, live: torch.Tensor, states: list[torch.Tensor]) -> None:
        """Keep one step's states; an ended row's later positions lie past its length, where no mask reads them,
        so only the latest-only buffer needs to leave ended rows alone."""
        if not self.latest_only:
            for layer, hidden in enumerate(states):
                self.values[layer, :, position] = hidden
            return
        live = live.to(self.values.device)[:, None]
        for layer, hidden in enumerate(states):
            latest = self.values[layer, :, 0]
            latest.copy_(torch.where(live, hidden.to(latest.device, latest.dtype), latest))

    def hidden(self, width: int) -> Iterator[torch.Tensor]:
        """Each layer's ``(rows, width, hidden)`` states (width 1 with ``latest_only``)."""
        for layer in self.values:
            yield layer if self.latest_only else layer[:, :width]


def rows_can_differ(sequences: list[list[int]]) -> bool:
    """Whether the probes differ at all, decided on token ids: a row's state depends only on its probe's tokens and
    its position, so identical probes give identical rows in every token mode (in ``all`` mode one probe's
    positions still differ from each other, but nothing varies between probes, which is what halves of the
    probes, and the answer's firmness, are about)."""
    return len(set(map(tuple, sequences))) > 1


def padded_batch(sequences: list[list[int]], device: torch.device,
                 positions: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids right-padded (with 0) to the longest rounded up to ``WIDTH_STEP`` (but not past the model's
    ``positions``), and their attention mask."""
    longest = max(map(len, sequences))
    width = -(-longest // WIDTH_STEP) * WIDTH_STEP
    if positions:
        width = max(longest, min(width, positions))
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
    return ids.to(device), mask.to(device)


def kept_dtype(lm: LanguageModel) -> torch.dtype:
    """What rows kept whole are stored in: a 16-bit model's own dtype, which its hidden states come in
    (so storing them loses nothing and the row sample is half the size), else float32."""
    return lm.dtype if lm.dtype in (torch.bfloat16, torch.float16) else torch.float32


def _take(hidden: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """The rows at ``flat`` of a ``(batch, width, hidden)`` tensor, as float32."""
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat.to(hidden.device)).float().to(flat.device)
