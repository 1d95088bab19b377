"""Capture the residual stream after every block, at the tokens a token mode selects.

The blocks run through ``models.running`` (or block by block from disk, ``models.stream``), which hands
over the input of block 0 (the embeddings) and each block's output, before the final norm; the forward
stops after the last block, so the LM head never runs. Each hidden state is reduced at once to the
token mode's rows' norms and the block's input/output dot products (turned into cosines once the last
block has run), and only the rows planned for the row sample are kept whole, so no batch's hidden
states outlive its forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..common.errors import CritlayerError
from ..models import LanguageModel, running
from ..models.stream import stream_blocks
from .probes import Probes

TOKEN_MODES = ("last", "all", "mean")
# A token whose norm exceeds this multiple of its layer's median is a massive-activation token. On
# smollm2-135m about 2% of tokens sit above 5x (and 3 of 64 last tokens, which alone made the CKA
# of blocks 0-11 look "critical"), with a gap below; normal tokens stay under 3x.
SINK_RATIO = 5.0
# The medians that ratio refers to come from the rows of the first probes in (length-sorted) order,
# so the filter does not depend on batch size.
REFERENCE_SAMPLES = 32
PLAN_CHUNK = 4096  # probes whose row keys are drawn at once when planning the row sample
# Probes per forward. On a 2-core CPU, batches of 16 probes (64 tokens at most) ran 3-16% faster than 32
# on smollm2-135m and gemma3-270m with 30-90 MB less peak memory; on a GPU a larger batch may pay.
BATCH_SIZE = 16
# Batch widths are rounded up to a multiple of this. oneDNN keeps kernels per input shape, so a forward over
# many widths holds more memory: a bf16 forward over 2,048 wiki probes (24 widths) kept 108 MB against 47 MB
# for 256 (3 widths); rounding adds 1% of padding there.
WIDTH_STEP = 8
COSINE_EPS = 1e-8  # a row norm below this counts as this, as in torch.nn.functional.cosine_similarity


@dataclass
class Batch:
    """What one probe batch leaves after its pass.

    ``states`` are the rows the row sample keeps whole: ``states[0]`` the input of block 0 (the
    embeddings) and ``states[i + 1]`` the output of block ``i``, of shape ``(L + 1, rows, hidden)``
    in ``kept_dtype`` (float32 means in ``mean`` mode); ``keys`` are their deterministic numbers in
    [0, 1) (see ``Capture.sample_keys``) and ``samples`` the probe each comes from (what a bootstrap
    resamples). ``cosines`` ``(L, all rows)`` holds, for every row of the batch whether kept or not,
    the cosine between each block's input and output.
    """

    states: torch.Tensor
    keys: torch.Tensor
    samples: np.ndarray | None = None
    cosines: torch.Tensor | None = None


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


def row_keys(seed: int, samples: np.ndarray, positions: np.ndarray) -> torch.Tensor:
    """A splitmix64 hash of (seed, sample, position) mapped to [0, 1)."""
    with np.errstate(over="ignore"):
        x = (samples.astype(np.uint64) << np.uint64(24)) ^ positions.astype(np.uint64)
        x = x + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return torch.from_numpy((x >> np.uint64(11)).astype(np.float64) / float(1 << 53))


class _Rows:
    """One batch's token-mode rows as its hidden states go by: every layer's row norms and every block's
    input/output cosines, and whole rows only at ``kept`` (all of them when ``kept`` is None).

    The results are allocated before the forward and filled in place: small tensors created during
    it and kept after it pin the allocator's heap and can cost hundreds of MB of resident memory.
    A block's cosines are the dot products of its input and output rows until the last block, then
    divided by the norms of both at once.
    """

    def __init__(self, lm: LanguageModel, flat: torch.Tensor, samples: np.ndarray, keys: torch.Tensor,
                 kept: torch.Tensor | None):
        self.flat, self.samples, self.keys, self.kept = flat, samples, keys, kept
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
    """Iterate over probe batches, yielding what each leaves (see ``Batch``).

    Token modes: ``last`` takes the last non-pad token of each sample; ``all`` every non-pad
    token but position 0 (an attention sink); ``mean`` the mean over the same tokens as ``all``.
    In every mode, massive-activation tokens (norm above ``sink_ratio`` times the layer's median
    row norm over the first ``REFERENCE_SAMPLES`` probes, at any layer; 0 disables) are dropped
    and counted. Batches are sorted by length to spend little on padding.

    Before the pass, the keys of every row it will take are known (they hash the sample and the
    position), so ``sample_keys``, the ``max_rows`` smallest (all with None), fixes which rows are
    kept whole; every other row is reduced to its norms and cosines inside the forward, so memory
    does not grow with the number of tokens.
    """

    def __init__(self, lm: LanguageModel, probes: Probes, *, token_mode: str = "last", batch_size: int = BATCH_SIZE,
                 seed: int = 0, sink_ratio: float = SINK_RATIO, max_rows: int | None = None, progress: bool = True):
        if token_mode not in TOKEN_MODES:
            raise CritlayerError(f"unknown token mode {token_mode!r}; choose one of {', '.join(TOKEN_MODES)}")
        if batch_size < 1:
            raise CritlayerError(f"batch size must be at least 1, got {batch_size}")
        if lm.streamed and token_mode == "mean":
            raise CritlayerError("block-by-block mode keeps every token of every batch for the mean; "
                                 "use --token-mode last or all with it")
        self.lm, self.token_mode, self.batch_size = lm, token_mode, batch_size
        self.seed, self.sink_ratio, self.progress = seed, sink_ratio, progress
        self.stats = CaptureStats()
        usable = [i for i, ids in enumerate(probes.token_ids) if len(ids) >= 2]
        self.stats.too_short = len(probes) - len(usable)
        if len(usable) < 2:
            raise CritlayerError(f"sequences too short: {len(usable)} of {len(probes)} probes have 2 tokens "
                                 "(position 0 is an attention sink and never measured); need 2 such probes")
        if not rows_can_differ([probes.token_ids[i] for i in usable], token_mode):
            raise CritlayerError("the probes are identical, so every block gives each of them the same output; "
                                 "use more varied probes")
        self.order = sorted(usable, key=lambda i: (-len(probes.token_ids[i]), i))
        self.token_ids = probes.token_ids
        self.sample_keys = self._plan(max_rows)

    def _plan(self, max_rows: int | None) -> torch.Tensor:
        """The sorted keys of the rows kept whole: the ``max_rows`` smallest over every row of the pass."""
        kept = torch.empty(0, dtype=torch.float64)
        for first in range(0, len(self.order), PLAN_CHUNK):
            samples = np.array(self.order[first:first + PLAN_CHUNK])
            lengths = np.array([len(self.token_ids[i]) for i in samples])
            if self.token_mode == "last":
                positions = lengths - 1
            elif self.token_mode == "mean":
                positions = np.zeros_like(samples)  # one row per sample
            else:  # positions 1 .. length - 1 of every sample
                starts = np.cumsum(lengths - 1) - (lengths - 1)  # where each sample's rows begin
                positions = np.arange(int((lengths - 1).sum())) - np.repeat(starts - 1, lengths - 1)
                samples = np.repeat(samples, lengths - 1)
            kept = torch.cat([kept, row_keys(self.seed, samples, positions)])
            if max_rows is not None and len(kept) > max_rows:
                kept = kept.topk(max_rows, largest=False).values
        return kept.sort().values

    def __iter__(self):
        pending = []
        self.reference = None
        enough = min(len(self.order), REFERENCE_SAMPLES)
        seen = 0
        for rows, mask in self._captured():
            pending.append(rows)
            seen += mask.shape[0]
            self.stats.samples += mask.shape[0]
            self.stats.tokens += int(mask.sum())
            if self.sink_ratio > 0 and self.reference is None:
                if seen < enough:
                    continue  # hold batches until the reference probes have been seen
                self.reference = self._reference_norms(pending, set(self.order[:enough]))
            for held in pending:
                batch = self._finish(held)
                self.stats.rows += batch.cosines.shape[1]
                yield batch
            pending = []

    def _captured(self):
        """Per batch, its rows (``_Rows``, every layer added) and its mask."""
        lm = self.lm
        batches = [(samples, *self._pad(samples)) for samples in
                   (np.array(self.order[i:i + self.batch_size]) for i in range(0, len(self.order), self.batch_size))]
        if lm.streamed:
            collected = [self._rows(mask, samples) for samples, _, mask in batches]
            with torch.inference_mode():
                stream_blocks(lm, [(ids, mask) for _, ids, mask in batches],
                              lambda hidden, b: collected[b].add(hidden), progress=self.progress)
            for _, _, mask in batches:
                yield collected.pop(0), mask
            return
        total = sum(len(self.token_ids[i]) for i in self.order)
        bar = tqdm(total=total, desc=f"capturing {lm.num_layers} blocks", unit="tok", disable=not self.progress)
        current: list[_Rows] = []  # the batch in flight
        with running.watching(lm, lambda hidden: current[0].add(hidden)), torch.inference_mode(), bar:
            for samples, ids, mask in batches:
                current[:] = [self._rows(mask, samples)]
                running.forward_blocks(lm, ids, mask)
                if current[0].added != lm.num_layers + 1:
                    raise CritlayerError(f"captured {current[0].added} hidden states, expected {lm.num_layers + 1}")
                bar.update(int(mask.sum()))
                yield current.pop(), mask

    def _pad(self, samples: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return padded_batch([self.token_ids[i] for i in samples], self.lm.device,
                            getattr(self.lm.config, "max_position_embeddings", None))

    def _rows(self, mask: torch.Tensor, samples: np.ndarray) -> _Rows:
        """A batch's token-mode tokens (flat ``row * width + position`` indices), keyed, and which to keep whole."""
        batch, width = mask.shape
        if self.token_mode == "last":
            flat = torch.arange(batch, device=mask.device) * width + mask.sum(1) - 1
        else:
            keep = mask.bool().clone()
            keep[:, 0] = False  # position 0 is an attention sink in every model we measured
            flat = keep.flatten().nonzero().squeeze(1)
        row_sample, row_pos = samples[(flat // width).cpu().numpy()], (flat % width).cpu().numpy()
        keys = row_keys(self.seed, row_sample, row_pos)
        kept = None if self.token_mode == "mean" else self._in_sample(keys).nonzero().squeeze(1).to(mask.device)
        return _Rows(self.lm, flat, row_sample, keys, kept)

    def _in_sample(self, keys: torch.Tensor) -> torch.Tensor:
        return keys <= self.sample_keys[-1]

    def _reference_norms(self, pending: list[_Rows], reference: set[int]) -> torch.Tensor:
        """Per-layer median row norm over the reference probes (the first, longest ones in order)."""
        norms = [rows.norms[:, np.isin(rows.samples, list(reference))] for rows in pending]
        return torch.cat(norms, dim=1).median(dim=1, keepdim=True).values

    def _finish(self, rows: _Rows) -> Batch:
        """Drop massive-activation rows and average per sample in ``mean`` mode."""
        cosines, states = rows.cosines, rows.states
        sinks = torch.zeros(cosines.shape[1], dtype=torch.bool, device=cosines.device)
        if self.sink_ratio > 0:
            sinks = (rows.norms > self.sink_ratio * self.reference).any(0)
            self.stats.sinks_dropped += int(sinks.sum())
        if self.token_mode == "mean":
            states, samples = self._mean_per_sample(states[:, ~sinks], rows.samples[(~sinks).cpu().numpy()])
            keys = row_keys(self.seed, samples, np.zeros_like(samples))
            cosines = torch.nn.functional.cosine_similarity(states[:-1], states[1:], dim=-1)
            kept = self._in_sample(keys)
            return Batch(states[:, kept.to(states.device)], keys[kept], samples[kept.numpy()], cosines)
        whole = ~sinks[rows.kept]
        kept = rows.kept[whole].cpu().numpy()
        return Batch(states[:, whole], rows.keys[kept], rows.samples[kept], cosines[:, ~sinks])

    @staticmethod
    def _mean_per_sample(rows: torch.Tensor, row_sample: np.ndarray):
        """Per sample (in the order they come), the mean of its rows."""
        samples, first, index = np.unique(row_sample, return_index=True, return_inverse=True)
        order = np.argsort(first)
        index = torch.from_numpy(np.argsort(order)[index]).to(rows.device)
        sums = torch.zeros(rows.shape[0], len(samples), rows.shape[2], device=rows.device).index_add_(1, index, rows)
        counts = torch.bincount(index, minlength=len(samples)).to(rows.dtype)
        return sums / counts[None, :, None], samples[order]


def rows_can_differ(sequences: list[list[int]], token_mode: str) -> bool:
    """Whether a token mode's rows can differ at all, decided on token ids: a row's state depends only on its
    probe's tokens and its position, so identical probes give identical rows (in ``all`` mode the positions
    of one probe still differ)."""
    distinct = set(map(tuple, sequences))
    return len(distinct) > 1 or (token_mode == "all" and len(next(iter(distinct))) > 2)


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
