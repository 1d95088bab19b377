"""A bounded, deterministic sample of captured rows for the measures that need whole matrices.

The sample lives in a temporary file, not in memory: it is the one part of a scan that grows with
the number of probes (``layers x rows x hidden``: 146 MB for smollm2-135m at 2,048 rows in float32,
half that in bfloat16, gigabytes for large models), and the measures read it a layer or a slab of
rows at a time.
"""

from __future__ import annotations

import math
import os
import tempfile

import numpy as np
import torch

from ..capture import Batch
from ...common.errors import CritlayerError


class RowSample:
    """The rows a capture keeps whole, for the measures that need whole matrices.

    A capture fixes before its pass which rows these are (``Capture.sample_keys``: the ``max_rows``
    smallest keys, which depend only on seed, sample and position), and hands them over in one order
    whatever the batch size: probes longest first, tokens in position order. Each batch's rows are
    appended to an unnamed temporary file (in ``$TMPDIR``; gone when the sample is), one write per
    layer, so the sample never counts against memory. Massive-activation rows among the planned ones
    never arrive, so the sample may hold fewer rows than planned.
    """

    def __init__(self, keys: torch.Tensor):
        self.planned = keys
        self.file = None
        self.count = 0
        self._keys = torch.empty(len(keys), dtype=torch.float64)
        self._samples = np.full(len(keys), -1, dtype=np.int64)
        self.sums = self.squares = None  # per layer, in float64: the rows' sum and their summed squared norm

    def __len__(self) -> int:
        return self.count

    def update(self, batch: Batch) -> None:
        rows = len(batch.keys)
        if not rows:
            return
        found = torch.searchsorted(self.planned, batch.keys).clamp(max=len(self.planned) - 1)
        if not torch.equal(self.planned[found], batch.keys) or self.count + rows > len(self.planned):
            raise ValueError("a row that is not in the planned sample")
        layers, _, hidden = batch.states.shape
        if self.file is None:
            self.layers, self.hidden, self.device = layers, hidden, batch.states.device
            self.dtype = batch.states.dtype
            self.file = tempfile.TemporaryFile(buffering=0)
            self.sums = torch.zeros(layers, hidden, dtype=torch.float64)
            self.squares = torch.zeros(layers, dtype=torch.float64)
        for layer, layer_rows in enumerate(batch.states):  # a layer at a time: no float64 copy of the batch
            wide = layer_rows.double().cpu()
            self.sums[layer] += wide.sum(0)
            self.squares[layer] += wide.square().sum()
        values = _bytes(batch.states.to(self.dtype).cpu())
        try:
            for layer, layer_rows in enumerate(values):
                os.pwrite(self.file.fileno(), layer_rows, self._offset(layer, self.count))
        except OSError as error:
            size = self._offset(layers, 0) / 2**20
            raise CritlayerError(f"cannot write the row sample ({size:.0f} MB) to {tempfile.gettempdir()}: "
                                 f"{error.strerror}; point TMPDIR at a larger disk or lower --max-rows") from error
        self._keys[self.count:self.count + rows] = batch.keys
        if batch.samples is not None:
            self._samples[self.count:self.count + rows] = batch.samples
        self.count += rows

    def _offset(self, layer: int, row: int) -> int:
        return _offset(layer, row, len(self.planned), self.hidden, self.dtype)

    def spread(self) -> torch.Tensor:
        """Per layer, the share of the rows' energy that is not their mean row (0 when every row is the same)."""
        centred = self.squares - self.sums.square().sum(1) / self.count
        return (centred / self.squares.clamp(min=1e-300)).clamp(min=0.0)

    def compute(self) -> "StoredRows":
        """The rows that arrived, in arrival order, as ``(L + 1, rows, hidden)`` float32 read on demand."""
        if self.file is None:
            raise ValueError("no rows captured")
        return StoredRows(self.file, range(self.layers), self.count, len(self.planned), self.hidden, self.dtype,
                          self.device)

    def row_keys(self) -> torch.Tensor:
        """The key of each row of ``compute()``, in the same order."""
        return self._keys[:self.count]

    def row_samples(self) -> np.ndarray:
        """The probe sample of each row of ``compute()``, in the same order."""
        return self._samples[:self.count]


class StoredRows:
    """Layers x rows x hidden in a file, indexed like a float32 tensor: ``[layer]`` reads one layer's
    rows, ``[first:stop]`` is a view of some layers, ``[:, rows]`` reads those rows of every layer.

    Each layer's rows lie side by side, so a layer or a run of rows is one read per layer; other
    rows are read from the lowest to the highest asked for, so sorted rows keep reads short.
    """

    def __init__(self, file, layers: range, rows: int, stride: int, hidden: int, dtype: torch.dtype,
                 device: torch.device):
        self.file, self.layers, self.rows, self.stride, self.hidden = file, layers, rows, stride, hidden
        self.dtype, self.device = dtype, device
        self.scratch = torch.empty(0, dtype=dtype)  # what ``read_into`` reads through, grown as needed

    @property
    def shape(self) -> tuple[int, int, int]:
        return len(self.layers), self.rows, self.hidden

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __getitem__(self, index):
        if isinstance(index, slice):
            return StoredRows(self.file, self.layers[index], self.rows, self.stride, self.hidden, self.dtype,
                              self.device)
        if isinstance(index, tuple):
            everything, rows = index
            if everything != slice(None):
                raise IndexError("StoredRows reads [layer], [layers] or [:, rows]")
            return self._read(self.layers, rows)
        layer = self.layers[index]
        return self._read(range(layer, layer + 1), slice(None))[0]

    def read_into(self, out: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        """A run of rows of every layer into ``out`` (float32, on the device), through one reused buffer."""
        first, stop, _ = rows.indices(self.rows)
        shape = (len(self.layers), stop - first, self.hidden)
        if self.scratch.numel() < math.prod(shape):
            self.scratch = torch.empty(math.prod(shape), dtype=self.dtype)
        return out.copy_(self._fill(self.scratch[:math.prod(shape)].view(shape), self.layers, first))

    def _read(self, layers: range, rows: slice | torch.Tensor) -> torch.Tensor:
        wanted = np.arange(self.rows)[rows] if isinstance(rows, slice) else rows.cpu().numpy()
        if not len(wanted):
            return torch.empty(len(layers), 0, self.hidden, device=self.device)
        low, high = int(wanted.min()), int(wanted.max()) + 1
        span = self._fill(torch.empty(len(layers), high - low, self.hidden, dtype=self.dtype), layers, low)
        contiguous = len(wanted) == high - low and bool((np.diff(wanted) == 1).all())
        return (span if contiguous else span[:, torch.from_numpy(wanted - low)]).to(self.device, torch.float32)

    def _fill(self, raw: torch.Tensor, layers: range, first: int) -> torch.Tensor:
        """``raw`` (layers x rows x hidden, stored dtype) read from row ``first`` of each of ``layers``."""
        for part, layer in zip(_bytes(raw), layers):
            self.file.seek(_offset(layer, first, self.stride, self.hidden, self.dtype))
            self.file.readinto(part)
        return raw


def _offset(layer: int, row: int, stride: int, hidden: int, dtype: torch.dtype) -> int:
    """Where a row starts in the file: each layer holds ``stride`` rows of ``hidden`` values."""
    return (layer * stride + row) * hidden * dtype.itemsize


def _bytes(values: torch.Tensor) -> np.ndarray:
    """A CPU tensor's memory as a numpy array of same-sized integers (numpy has no bfloat16)."""
    return values.view({2: torch.int16, 4: torch.int32}[values.element_size()]).numpy()


def read_rows(states: torch.Tensor | StoredRows, rows: slice, out: torch.Tensor) -> torch.Tensor:
    """``states[:, rows]`` into ``out``; a file-backed sample reads it without allocating."""
    if isinstance(states, StoredRows):
        return states.read_into(out, rows)
    return out.copy_(states[:, rows])


def pick_rows(layer: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """``layer`` itself, or the given rows of it (a bootstrap replicate's indices, repeats allowed)."""
    return layer if rows is None else layer[rows.to(layer.device)]


def resample_rows(row_samples: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Row indices of one bootstrap replicate: probe samples drawn with replacement, all rows of each."""
    samples, inverse = np.unique(row_samples, return_inverse=True)
    counts = np.bincount(rng.integers(0, len(samples), len(samples)), minlength=len(samples))
    return np.repeat(np.arange(len(row_samples)), counts[inverse])
