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
from dataclasses import dataclass

import numpy as np
import torch

from ...common.errors import CritlayerError


@dataclass
class Batch:
    """What one probe batch leaves after its pass.

    ``states`` are the rows the row sample keeps whole: ``states[0]`` the input of block 0 (the
    embeddings) and ``states[i + 1]`` the output of block ``i``, of shape ``(L + 1, rows, hidden)``
    in ``kept_dtype`` (float32 means in ``mean`` mode); ``keys`` are their deterministic numbers in
    [0, 1) (``capture.row_keys``) and ``samples`` the probe each comes from (what a replicate draws
    halves of). ``cosines`` ``(L, all rows)`` holds, for every row of the batch whether kept or not,
    the cosine between each block's input and output.
    """

    states: torch.Tensor
    keys: torch.Tensor
    samples: np.ndarray | None = None
    cosines: torch.Tensor | None = None


class RowSample:
    """The rows kept whole for the measures that need whole matrices: the ``capacity`` rows with the smallest keys
    of all rows seen so far (a bottom-k sample).

    Row keys hash (seed, probe, position), so which rows end up kept depends only on which rows were seen,
    never on batch sizes or the order they came in; a row that gives way to one with a smaller key is
    overwritten in place. Rows live in an unnamed temporary file (in ``$TMPDIR``; gone when the sample is),
    so the sample never counts against memory.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.file = None
        self.count = 0
        self._keys = torch.full((capacity,), float("inf"), dtype=torch.float64)
        self._samples = np.full(capacity, -1, dtype=np.int64)

    def __len__(self) -> int:
        return self.count

    def threshold(self) -> float:
        """Rows with a key at or above this cannot enter the sample."""
        return float("inf") if self.count < self.capacity else float(self._keys.max())

    def update(self, batch: Batch) -> None:
        keys = batch.keys
        if not len(keys):
            return
        layers, _, hidden = batch.states.shape
        if self.file is None:
            self.layers, self.hidden, self.device = layers, hidden, batch.states.device
            self.dtype = batch.states.dtype
            self.file = tempfile.TemporaryFile(buffering=0)
        candidates = torch.cat([self._keys[:self.count], keys])
        chosen = torch.ones(len(candidates), dtype=torch.bool)
        if len(candidates) > self.capacity:
            chosen[:] = False
            chosen[candidates.topk(self.capacity, largest=False).indices] = True
        entering = chosen[self.count:].nonzero().squeeze(1)
        freed = (~chosen[:self.count]).nonzero().squeeze(1)
        slots = torch.cat([freed, torch.arange(self.count, self.count + len(entering) - len(freed))])
        self._write(batch.states[:, entering.to(batch.states.device)], slots)
        self._keys[slots] = keys[entering]
        if batch.samples is not None:
            self._samples[slots.numpy()] = batch.samples[entering.numpy()]
        self.count += len(entering) - len(freed)

    def _write(self, rows: torch.Tensor, slots: torch.Tensor) -> None:
        """``rows`` (layers x rows x hidden) into ``slots``, one write per run of consecutive slots and layer."""
        order = slots.argsort()
        slots, values = slots[order], _bytes(rows[:, order.to(rows.device)].to(self.dtype).cpu())
        breaks = (np.flatnonzero(np.diff(slots.numpy()) != 1) + 1).tolist()
        try:
            for begin, end in zip([0, *breaks], [*breaks, len(slots)]):
                for layer, layer_rows in enumerate(values):
                    os.pwrite(self.file.fileno(), layer_rows[begin:end], self._offset(layer, int(slots[begin])))
        except OSError as error:
            size = self._offset(self.layers, 0) / 2**20
            raise CritlayerError(f"cannot write the row sample ({size:.0f} MB) to {tempfile.gettempdir()}: "
                                 f"{error.strerror}; point TMPDIR at a larger disk or lower --max-rows") from error

    def _offset(self, layer: int, row: int) -> int:
        return _offset(layer, row, self.capacity, self.hidden, self.dtype)

    def spread(self) -> torch.Tensor:
        """Per layer, the share of the rows' energy that is not their mean row (0 when every row is the same)."""
        spreads = []
        for layer in self.compute():
            wide = layer.double()
            squares = wide.square().sum()
            spreads.append(((squares - wide.sum(0).square().sum() / len(wide)) / squares.clamp(min=1e-300)).item())
        return torch.tensor(spreads, dtype=torch.float64).clamp(min=0.0)

    def compute(self) -> "StoredRows":
        """The rows held, in slot order, as ``(L + 1, rows, hidden)`` float32 read on demand."""
        if self.file is None:
            raise ValueError("no rows captured")
        return StoredRows(self.file, range(self.layers), self.count, self.capacity, self.hidden, self.dtype,
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
    """Row indices of one replicate: half the probes, drawn without replacement, and every row of each."""
    samples, inverse = np.unique(row_samples, return_inverse=True)
    return np.flatnonzero(_half(len(samples), rng)[inverse])


def half_weights(count: int, rng: np.random.Generator) -> np.ndarray:
    """A weight per text of one replicate: 1 for half of them drawn without replacement, 0 for the rest."""
    return _half(count, rng).astype(float)


def _half(count: int, rng: np.random.Generator) -> np.ndarray:
    chosen = np.zeros(count, dtype=bool)
    chosen[rng.choice(count, size=max(1, count // 2), replace=False)] = True
    return chosen
