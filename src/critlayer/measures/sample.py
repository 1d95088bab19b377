"""A bounded, deterministic sample of captured rows for the measures that need whole matrices.

The sample lives in a temporary file, not in memory: it is the one part of a scan that grows with
the number of probes (``layers x rows x hidden`` float32, 146 MB for smollm2-135m at 2,048 rows and
gigabytes for large models), and the measures read it a layer or a slab of rows at a time.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch

from ..capture import Batch
from ..errors import CritlayerError

FLOAT = np.dtype(np.float32)


class RowSample:
    """The rows a capture keeps whole, in key order, for the measures that need whole matrices.

    A capture fixes before its pass which rows these are (``Capture.sample_keys``: the ``max_rows``
    smallest keys, which depend only on seed, sample and position). Each row is written into its
    slot of an unnamed temporary file (in ``$TMPDIR``; gone when the sample is), so the sample's
    content and order do not depend on batching and its size never counts against memory.
    Massive-activation rows among the planned ones never arrive; ``compute`` skips their slots.
    """

    def __init__(self, keys: torch.Tensor):
        self.keys = keys
        self.file = None
        self.filled = torch.zeros(len(keys), dtype=torch.bool)
        self.samples = np.full(len(keys), -1, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.filled.sum())

    def update(self, batch: Batch) -> None:
        if not batch.keys.numel():
            return
        slots = torch.searchsorted(self.keys, batch.keys).clamp(max=len(self.keys) - 1)
        if not torch.equal(self.keys[slots], batch.keys):
            raise ValueError("a row that is not in the planned sample")
        layers, _, hidden = batch.states.shape
        if self.file is None:
            self.layers, self.hidden, self.device = layers, hidden, batch.states.device
            self.file = tempfile.TemporaryFile(buffering=0)
        rows = batch.states.float().cpu().numpy()
        try:
            for layer in range(layers):
                for slot, row in zip(slots.tolist(), rows[layer]):
                    os.pwrite(self.file.fileno(), row, (layer * len(self.keys) + slot) * hidden * FLOAT.itemsize)
        except OSError as error:
            size = layers * len(self.keys) * hidden * FLOAT.itemsize / 2**20
            raise CritlayerError(f"cannot write the row sample ({size:.0f} MB) to {tempfile.gettempdir()}: "
                                 f"{error.strerror}; point TMPDIR at a larger disk or lower --max-rows") from error
        self.filled[slots] = True
        if batch.samples is not None:
            self.samples[slots.numpy()] = batch.samples

    def compute(self) -> "StoredRows":
        """The rows that arrived, ordered by key, as ``(L + 1, rows, hidden)`` float32 read on demand."""
        if self.file is None:
            raise ValueError("no rows captured")
        slots = self.filled.nonzero().squeeze(1).numpy()
        return StoredRows(self.file, range(self.layers), slots, len(self.keys), self.hidden, self.device)

    def row_samples(self) -> np.ndarray:
        """The probe sample of each row of ``compute()``, in the same order."""
        return self.samples[self.filled.numpy()]


class StoredRows:
    """Layers x rows x hidden float32 in a file, indexed like a tensor: ``[layer]`` reads one layer's
    rows, ``[first:stop]`` is a view of some layers, ``[:, rows]`` reads those rows of every layer.

    A read spans from the lowest to the highest row asked for, so reads of sorted rows stay the
    size of what they return.
    """

    def __init__(self, file, layers: range, slots: np.ndarray, stride: int, hidden: int, device: torch.device):
        self.file, self.layers, self.slots, self.stride, self.hidden, self.device = file, layers, slots, stride, hidden, device

    @property
    def shape(self) -> tuple[int, int, int]:
        return len(self.layers), len(self.slots), self.hidden

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __getitem__(self, index):
        if isinstance(index, slice):
            return StoredRows(self.file, self.layers[index], self.slots, self.stride, self.hidden, self.device)
        if isinstance(index, tuple):
            everything, rows = index
            if everything != slice(None):
                raise IndexError("StoredRows reads [layer], [layers] or [:, rows]")
            return self._read(self.layers, rows)
        layer = self.layers[index]
        return self._read(range(layer, layer + 1), slice(None))[0]

    def _read(self, layers: range, rows: slice | torch.Tensor) -> torch.Tensor:
        slots = self.slots[rows] if isinstance(rows, slice) else self.slots[rows.cpu().numpy()]
        if not len(slots):
            return torch.empty(len(layers), 0, self.hidden, device=self.device)
        low, high = int(slots.min()), int(slots.max()) + 1
        span = np.empty((len(layers), high - low, self.hidden), dtype=FLOAT)
        for out, layer in zip(span, layers):
            self.file.seek((layer * self.stride + low) * self.hidden * FLOAT.itemsize)
            self.file.readinto(out)
        contiguous = len(slots) == high - low and slots[0] == low and bool((np.diff(slots) == 1).all())
        return torch.from_numpy(span if contiguous else span[:, slots - low]).to(self.device)


def pick_rows(layer: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """``layer`` itself, or the given rows of it (a bootstrap replicate's indices, repeats allowed)."""
    return layer if rows is None else layer[rows.to(layer.device)]


def resample_rows(row_samples: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Row indices of one bootstrap replicate: probe samples drawn with replacement, all rows of each."""
    samples, inverse = np.unique(row_samples, return_inverse=True)
    counts = np.bincount(rng.integers(0, len(samples), len(samples)), minlength=len(samples))
    return np.repeat(np.arange(len(row_samples)), counts[inverse])
