"""Capture the residual stream after every block, at the tokens a token mode selects.

Forward hooks on the blocks read each block's output (before the final norm); a pre-hook on
the first block reads its input (the embeddings). The hook on the last block stops the
forward, so the final norm and the LM head never run and logits are never computed.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import CritlayerError
from .models import LanguageModel
from .probes import Probes

TOKEN_MODES = ("last", "all", "mean")
# A token whose norm exceeds this multiple of its layer's median is a massive-activation token. On
# smollm2-135m about 2% of tokens sit above 5x (and 3 of 64 last tokens, which alone made the CKA
# of blocks 0-11 look "critical"), with a gap below; normal tokens stay under 3x.
SINK_RATIO = 5.0
# The medians that ratio refers to come from the rows of the first probes in (length-sorted) order,
# so the filter does not depend on batch size.
REFERENCE_SAMPLES = 32


@dataclass
class Batch:
    """The captured rows of one probe batch.

    ``states[0]`` is the input of block 0 (the embeddings) and ``states[i + 1]`` the output of
    block ``i``, as float32 of shape ``(L + 1, rows, hidden)``. ``keys`` are deterministic
    per-row numbers in [0, 1) used to subsample rows independently of batching; ``samples``
    the probe each row comes from (what a bootstrap resamples).
    """

    states: torch.Tensor
    keys: torch.Tensor
    samples: np.ndarray | None = None


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


class StopForward(Exception):
    """Raised by the last block's hook: nothing after it is needed."""


@contextmanager
def block_outputs(lm: LanguageModel, take=lambda hidden: hidden):
    """Hook the blocks; yields a list that each forward fills with ``take`` of its ``L + 1`` hidden states.

    Taking the rows a token mode needs inside the hook keeps no block's whole output alive.
    """
    outputs: list[torch.Tensor] = []
    last = len(lm.blocks) - 1

    def before_first(module, args, kwargs):
        outputs.clear()
        outputs.append(take(args[0] if args else kwargs["hidden_states"]))

    def after(index):
        def hook(module, args, output):
            outputs.append(take(output[0] if isinstance(output, (tuple, list)) else output))
            if index == last:
                raise StopForward
        return hook

    handles = [lm.blocks[0].register_forward_pre_hook(before_first, with_kwargs=True)]
    handles += [block.register_forward_hook(after(i)) for i, block in enumerate(lm.blocks)]
    was_training = lm.model.training
    lm.model.eval()
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()
        lm.model.train(was_training)


def run_blocks(lm: LanguageModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               outputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """One forward through the blocks only (inside ``block_outputs``); returns what it took of the L + 1 states."""
    try:
        lm.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except StopForward:
        pass
    if len(outputs) != lm.num_layers + 1:
        raise CritlayerError(f"captured {len(outputs)} hidden states, expected {lm.num_layers + 1}")
    return list(outputs)


def row_keys(seed: int, samples: np.ndarray, positions: np.ndarray) -> torch.Tensor:
    """A splitmix64 hash of (seed, sample, position) mapped to [0, 1)."""
    with np.errstate(over="ignore"):
        x = (samples.astype(np.uint64) << np.uint64(24)) ^ positions.astype(np.uint64)
        x = x + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return torch.from_numpy((x >> np.uint64(11)).astype(np.float64) / float(1 << 53))


class Capture:
    """Iterate over probe batches, yielding the captured rows of each (see ``Batch``).

    Token modes: ``last`` takes the last non-pad token of each sample; ``all`` every non-pad
    token but position 0 (an attention sink); ``mean`` the mean over the same tokens as ``all``.
    In every mode, massive-activation tokens (norm above ``sink_ratio`` times the layer's median
    row norm over the first ``REFERENCE_SAMPLES`` probes, at any layer; 0 disables) are dropped
    and counted. Batches are sorted by length to spend little on padding.
    """

    def __init__(self, lm: LanguageModel, probes: Probes, *, token_mode: str = "last", batch_size: int = 32,
                 seed: int = 0, sink_ratio: float = SINK_RATIO, progress: bool = True):
        if token_mode not in TOKEN_MODES:
            raise CritlayerError(f"unknown token mode {token_mode!r}; choose one of {', '.join(TOKEN_MODES)}")
        if batch_size < 1:
            raise CritlayerError(f"batch size must be at least 1, got {batch_size}")
        if lm.streamed and token_mode != "last":
            raise CritlayerError("block-by-block mode keeps the captured tokens of every block until the last one; "
                                 "use --token-mode last with it")
        self.lm, self.token_mode, self.batch_size = lm, token_mode, batch_size
        self.seed, self.sink_ratio, self.progress = seed, sink_ratio, progress
        self.stats = CaptureStats()
        usable = [i for i, ids in enumerate(probes.token_ids) if len(ids) >= 2]
        self.stats.too_short = len(probes) - len(usable)
        if len(usable) < 2:
            raise CritlayerError(f"sequences too short: {len(usable)} of {len(probes)} probes have 2 tokens "
                                 "(position 0 is an attention sink and never measured); need 2 such probes")
        self.order = sorted(usable, key=lambda i: (-len(probes.token_ids[i]), i))
        self.token_ids = probes.token_ids

    def __iter__(self):
        pending = []
        self.reference = None
        enough = min(len(self.order), REFERENCE_SAMPLES)
        seen = 0
        for raw, mask in self._captured():
            pending.append(raw)
            seen += mask.shape[0]
            self.stats.samples += mask.shape[0]
            self.stats.tokens += int(mask.sum())
            if self.sink_ratio > 0 and self.reference is None:
                if seen < enough:
                    continue  # hold batches until the reference probes have been seen
                self.reference = self._reference_norms(pending, set(self.order[:enough]))
            for rows in pending:
                batch = self._finish(*rows)
                self.stats.rows += batch.states.shape[1]
                yield batch
            pending = []

    def _captured(self):
        """Per batch, its token mode's rows at every layer (with their sample and position) and its mask."""
        lm = self.lm
        batches = [(samples, *self._pad(samples)) for samples in
                   (np.array(self.order[i:i + self.batch_size]) for i in range(0, len(self.order), self.batch_size))]
        picks = [self._select(mask, samples) for samples, _, mask in batches]
        if lm.streamed:
            from .models.stream import stream_rows

            with torch.inference_mode():
                taken = stream_rows(lm, lm.weights, [(ids, mask) for _, ids, mask in batches],
                                    lambda hidden, b: _take(hidden, picks[b][0]), progress=self.progress)
                for (_, _, mask), (_, row_sample, row_pos), rows in zip(batches, picks, taken):
                    yield (torch.stack(rows), row_sample, row_pos), mask
            return
        total = sum(len(self.token_ids[i]) for i in self.order)
        bar = tqdm(total=total, desc=f"capturing {lm.num_layers} blocks", unit="tok", disable=not self.progress)
        current = [None]  # the flat indices of the batch in flight
        with block_outputs(lm, lambda hidden: _take(hidden, current[0])) as outputs, torch.inference_mode(), bar:
            for (_, ids, mask), (flat, row_sample, row_pos) in zip(batches, picks):
                current[0] = flat
                rows = run_blocks(lm, ids, mask, outputs)
                outputs.clear()
                bar.update(int(mask.sum()))
                yield (torch.stack(rows), row_sample, row_pos), mask

    def _pad(self, samples: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(self.token_ids[i]) for i in samples)
        ids = torch.zeros(len(samples), width, dtype=torch.long)
        mask = torch.zeros(len(samples), width, dtype=torch.long)
        for row, i in enumerate(samples):
            seq = self.token_ids[i]
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        return ids.to(self.lm.device), mask.to(self.lm.device)

    def _select(self, mask: torch.Tensor, samples: np.ndarray):
        """The flat (row * width + position) indices of the token mode's tokens, with their sample and position."""
        batch, width = mask.shape
        if self.token_mode == "last":
            flat = torch.arange(batch, device=mask.device) * width + mask.sum(1) - 1
        else:
            keep = mask.bool().clone()
            keep[:, 0] = False  # position 0 is an attention sink in every model we measured
            flat = keep.flatten().nonzero().squeeze(1)
        return flat, samples[(flat // width).cpu().numpy()], (flat % width).cpu().numpy()

    def _reference_norms(self, pending: list, reference: set[int]) -> torch.Tensor:
        """Per-layer median row norm over the reference probes (the first, longest ones in order)."""
        norms = [rows.norm(dim=-1)[:, np.isin(row_sample, list(reference))] for rows, row_sample, _ in pending]
        return torch.cat(norms, dim=1).median(dim=1, keepdim=True).values

    def _finish(self, rows: torch.Tensor, row_sample: np.ndarray, row_pos: np.ndarray) -> Batch:
        """Drop massive-activation rows, average per sample in ``mean`` mode, and key the rows."""
        if self.sink_ratio > 0:
            sinks = (rows.norm(dim=-1) > self.sink_ratio * self.reference).any(0)
            self.stats.sinks_dropped += int(sinks.sum())
            kept = (~sinks).cpu().numpy()
            rows, row_sample, row_pos = rows[:, ~sinks], row_sample[kept], row_pos[kept]
        if self.token_mode == "mean":
            rows, row_sample, row_pos = self._mean_per_sample(rows, row_sample)
        return Batch(rows, row_keys(self.seed, row_sample, row_pos), row_sample)

    @staticmethod
    def _mean_per_sample(rows: torch.Tensor, row_sample: np.ndarray):
        samples, index = np.unique(row_sample, return_inverse=True)
        index = torch.from_numpy(index).to(rows.device)
        sums = torch.zeros(rows.shape[0], len(samples), rows.shape[2], device=rows.device).index_add_(1, index, rows)
        counts = torch.bincount(index, minlength=len(samples)).to(rows.dtype)
        return sums / counts[None, :, None], samples, np.zeros_like(samples)


def _take(hidden: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """The rows at ``flat`` of a ``(batch, width, hidden)`` tensor, as float32."""
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat.to(hidden.device)).float().to(flat.device)
