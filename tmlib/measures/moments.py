"""Sufficient statistics of a layer's sample × transformation (ST) matrix, accumulated in one pass.

For every activation a of a layer, the ST matrix is A_ij = a(t_j(x_i)). The variance family of
measures needs, per activation,

* row statistics (over transformations j, for each sample i): complete inside a block of samples,
  summarised as Σ_i std_j(A_ij) and Σ_i var_j(A_ij);
* column statistics (over samples i, for each transformation j): running shifted sums
  Σ_i (A_ij − K_j) and Σ_i (A_ij − K_j)², with K_j the first sample's value.

Everything is accumulated in float64 from the float32 activations, so results are exact to float64
rounding and do not depend on how the samples are split into blocks. Shifting by a member of the
row/column makes constant rows and columns give exactly zero variance (needed for NV's 0/0 → 1
convention) and keeps cancellation harmless. The columns are a :class:`~.states.ShiftedMoments`
and the row sums plain sums (:class:`~.states.SumState`), so states merge exactly
(:meth:`STMoments.merge`) and partial results from different processes or devices combine into
the same answer. :class:`Moments` is the spec every measure reading these moments declares.

On the CPU the block update is one fused, multi-threaded numba kernel that reads each activation
once while it is still in cache; on other devices (or without numba) the same arithmetic runs as
torch ops.

Where the time goes (measured, 2 cores, AMD EPYC, SimpleConv on MNIST): per activation value the
kernel reads 4 bytes of float32 block once from memory (a block of 16 samples × 16 rotations of
conv0 is 25.7 MB, out of cache: a plain copy of it takes 2.6 ms) and, per work item of 256
activations, updates 2·m·256 float64 column sums and 2·256 row sums that stay in L1/L2. No float64
copy of the block, no temporaries. Until this version the update was one loop over six arrays that
LLVM did not vectorise (too many possible aliases for its run-time checks): 10.6–27 ms for that
block (0.24–0.6 G values/s); as two loops on 1-d slices (columns, then rows re-reading the row from
L1) it is vectorised, 5.1–6.0 ms (≈ 1.1–1.3 G values/s, about twice a memory copy), bit-identical.
Measured on an AVX-512 machine, that kernel was compute-bound, not memory-bound (a block in L2 and
one from memory: 1.15 and 1.34 G values/s): its m column sums per tile (100 kB) went through L2 for
every value. The columns now run transformation-outermost (a column's sums in L1 over the b
samples) and the rows re-read the tile from L2: [10, 25, 12,544] 2.6 → 2.0 ms, with Goodfellow's
counts 2.9 → 2.4 ms, bit-identical (checked against the kernel before on float32/float64 blocks with
NaN and ±inf, counting and not).
In a pass of the explorer (200 images × 16 rotations, TV + SV + NV + element NV) the kernel went
from 1.15 s to 0.47 s beside 2.0 s of forwards. The same arithmetic as torch ops costs ≈ 4–7
forward-times (float64 copies of the block, seven passes). Tried and kept: tiles of 256 (16…1024
measured), numba's OpenMP pool instead of its workqueue (1.75 → 1.31 × forward);
``OMP_WAIT_POLICY=PASSIVE`` and one numba thread measured no gain; fewer images per forward, so
that a block is still in cache when the hook reads it, lost more than it gained (500 × 25, variance
family, ratio to bare forwards of the same size: 1.62–1.76 at 25 images per forward, 1.46–1.55 at
50, 1.38–1.49 at 100, 1.20–1.25 at 250; the bare forwards themselves 10.8, 9.7, 9.6–10.0 and
10.5–10.7 s). With Goodfellow in the pass, the kernel also counts the values above its thresholds
(``above``) while each row is in L1. The readout of SV (``sample``:
the column variances, their square roots and their mean over transformations) is a second fused
kernel: a jackknife with K blocks reads it out K + 1 times per layer, and as torch ops (seven
passes, four [m, F] temporaries) it and the tree's merges are memory-bound
(benchmarks/bench_jackknife.py, SimpleConv(16), 200 images × 25 rotations, K = 10, 2 cores:
``compute`` 0.60 s as torch ops and 0.46 s fused on a quiet machine). Not done: one shift for rows
and columns (fewer loads, but constant columns would no longer give exactly SV = 0, breaking NV's
x/0 → inf convention) and float32 block partial sums (results would then depend on the batch size
at ~1e-7, above the 1e-9 the tests demand).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from ..jit import HAVE_NUMBA as _HAVE_NUMBA  # the torch path below is the fallback and the GPU path
from ..jit import numba
from .base import LayerInfo, PassContext, StatSpec
from .states import ShiftedMoments, SumState

__all__ = ["BACKENDS", "Moments", "STMoments", "check_backend", "numba_available", "use_numba"]

#: The statistics backends: ``"auto"`` (numba on the CPU, torch ops elsewhere), ``"numba"``, ``"torch"``
#: (the eager torch ops: the reference) and ``"compile"`` (the moments update compiled by
#: ``torch.compile`` into one fused kernel: C++ on the CPU, Triton on CUDA).
BACKENDS = ("auto", "numba", "torch", "compile")

_TILE = 256  # activations per parallel work item (fastest of 16…256 measured on 2 cores)
_NO_LIMIT = {torch.float32: np.zeros(0, np.float32), torch.float64: np.zeros(0, np.float64)}
_NO_COUNTS = np.zeros(0, np.int64)  # the kernel counts nothing


def numba_available() -> bool:
    return _HAVE_NUMBA


def check_backend(backend: Any) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto', 'numba', 'torch' or 'compile', got {backend!r}")
    return backend


def use_numba(backend: str, device: torch.device) -> bool:
    """Whether a state on ``device`` runs its fused numba kernel: ``"auto"`` on the CPU when numba
    is installed, always for ``"numba"`` (which then needs the CPU), never for ``"torch"`` or
    ``"compile"`` (the moments compiled by torch.compile, the other states' torch ops)."""
    check_backend(backend)
    if backend == "numba" and (device.type != "cpu" or not _HAVE_NUMBA):
        raise ValueError("backend='numba' needs numba installed and device='cpu'")
    # "compile" on the CPU is inductor's C++, not numba: until this was spelled out, "compile"
    # fell through to numba here and the compiled path was never run on the CPU.
    return backend in ("auto", "numba") and device.type == "cpu" and _HAVE_NUMBA


if _HAVE_NUMBA:

    @numba.njit(parallel=True, cache=True, fastmath=False, nogil=True)
    def _fused_update(x, shift, col_s1, col_s2, row_std_sum, row_var_sum, above, counts, tile):  # pragma: no cover
        # x: [b, m, F] (float32 or float64, C-contiguous); shift, sums float64. With ``counts``
        # ([F] int64, empty for none) it also adds #{values > above} per activation (``above``
        # [F], x's dtype: Goodfellow's thresholds) in the same read, and returns how many values
        # were NaN or ±inf (0 without counts).
        # Each work item owns `tile` activations. The columns go transformation by
        # transformation, sample by sample: a column's two running sums ([tile] float64) stay in
        # L1 over the b samples, and each activation value is read from memory once. The rows
        # then re-read the item's part of the block ([b, m, tile], 256 kB for 10 × 25 × 256
        # float32) from L2. (Samples outermost, the m column sums of a tile — [m, tile] × 2, 100 kB —
        # went through L2 for every value: 20 % slower.) Every loop is over 1-d slices indexed
        # from 0: with few arrays per loop LLVM's alias checks stay within its limit, and with an
        # index known not to be negative it loads whole vectors (an index from a tile's start
        # cost a gather). Per activation the same operations in the same order as the samples-
        # outermost kernel before it: bit-identical results.
        b, m, nf = x.shape
        count = counts.shape[0] > 0
        n_tiles = (nf + tile - 1) // tile
        bad = np.zeros(n_tiles, np.int64)  # per work item: a scalar reduction trips numba's parfor pass
        for t in numba.prange(n_tiles):
            f0 = t * tile
            w = min(nf, f0 + tile) - f0
            s1 = np.empty(w)
            s2 = np.empty(w)
            r1 = np.empty(w)
            r2 = np.empty(w)
            c = np.zeros(w if count else 0, np.int32)  # < 2^31 rows per call
            limit = above[f0 : f0 + w]
            nonfinite = 0
            for j in range(m):
                centre = shift[j, f0 : f0 + w]
                for f in range(w):
                    s1[f] = 0.0
                    s2[f] = 0.0
                for i in range(b):
                    row = x[i, j, f0 : f0 + w]
                    for f in range(w):
                        d = np.float64(row[f]) - centre[f]
                        s1[f] += d
                        s2[f] += d * d
                    if count:  # the row is in L1: ≈ 0.2 ms on a [256, 25088] block, 1.6 ms alone
                        for f in range(w):
                            v = row[f]
                            c[f] += np.int32(v > limit[f])
                            nonfinite += np.int32((v - v) != 0.0)  # NaN for NaN and ±inf
                total1 = col_s1[j, f0 : f0 + w]
                total2 = col_s2[j, f0 : f0 + w]
                for f in range(w):
                    total1[f] += s1[f]
                    total2[f] += s2[f]
            for i in range(b):
                x0 = x[i, 0, f0 : f0 + w]  # row shift: exact zeros for rows that do not vary
                for f in range(w):
                    r1[f] = 0.0
                    r2[f] = 0.0
                for j in range(m):
                    row = x[i, j, f0 : f0 + w]
                    for f in range(w):
                        r = np.float64(row[f]) - np.float64(x0[f])
                        r1[f] += r
                        r2[f] += r * r
                var_sum = row_var_sum[f0 : f0 + w]
                std_sum = row_std_sum[f0 : f0 + w]
                for f in range(w):
                    var = (r2[f] - r1[f] * r1[f] / m) / (m - 1)
                    if var < 0.0:  # rounding can leave -1e-17 for (near-)constant rows
                        var = 0.0
                    var_sum[f] += var
                    std_sum[f] += math.sqrt(var)
            if count:
                total = counts[f0 : f0 + w]
                for f in range(w):
                    total[f] += c[f]
            bad[t] = nonfinite
        return bad.sum()


    @numba.njit(parallel=True, cache=True, nogil=True)
    def _column_spread_mean(s1, s2, n, std, tile):  # pragma: no cover
        # SV per activation from the column sums [m, F]: mean over j of std_i (or var_i), the
        # variance read out as in ShiftedMoments.variance, in one read of s1 and s2 (the torch
        # readout is seven passes and four [m, F] temporaries, once per jackknife replicate).
        m, nf = s1.shape
        out = np.zeros(nf)
        for t in numba.prange((nf + tile - 1) // tile):
            f0 = t * tile
            f1 = min(nf, f0 + tile)
            for j in range(m):
                for f in range(f0, f1):
                    var = (s2[j, f] + (s1[j, f] * s1[j, f]) / -n) / (n - 1)
                    if var < 0.0:
                        var = 0.0
                    out[f] += math.sqrt(var) if std else var
            for f in range(f0, f1):
                out[f] /= m
        return out


def _torch_update(block, shift, col_s1, col_s2, row_std_sum, row_var_sum, m: int) -> None:
    """The block update as torch ops (block [b, m, F] float32 or float64; the sums added to in
    place): the reference, what CUDA runs eagerly, and what ``backend="compile"`` compiles."""
    # The float64 copy inside: compiled, it is fused away (the block is read once as float32);
    # made by the caller, the compiled kernel read a float64 copy twice the block's size.
    x = block.to(torch.float64)
    # One temporary of the block's size, squared in place: the same values as ShiftedMoments.update
    # and r·r (bit-identical to them), x the float64 copy of the block: 136 → 68 ms on a
    # [16, 16, 25088] float32 block, 2 cores, best of 12 side by side (numba: 5.5 ms). Subtracting
    # from the float32 block directly (type promotion, no copy) measured slower: 87 ms.
    work = x - shift
    col_s1 += work.sum(0)
    col_s2 += work.square_().sum(0)
    r1 = torch.sub(x, x[:, :1], out=work).sum(1)
    var = (work.square_().sum(1) - r1.square() / m) / (m - 1)
    var.clamp_(min=0.0)  # rounding can leave -1e-17 for (near-)constant rows
    row_var_sum += var.sum(0)
    row_std_sum += var.sqrt().sum(0)


@functools.cache  # made on first use: a compile costs 3-25 s
def _compiled_update():
    """:func:`_torch_update` compiled once per process by ``torch.compile`` (dynamic shapes: one
    compile for every layer and block size; inductor's on-disk cache makes later processes'
    compiles 3-4 s). On a [16, 16, 25088] float32 block, 2 cores: 3.3-5.3 ms against 110-125 ms
    eager (the float64 copy fused away) and 5.5 ms for the numba kernel; rel 2e-16 from eager."""
    return torch.compile(_torch_update, dynamic=True)


class STMoments(SumState):
    """Mergeable float64 moments of one layer's ST matrix.

    Args:
        m: number of transformations (≥ 2).
        num_features: activations per sample (the product of the activation's shape).
        device: where the accumulators live (the model's device).
        backend: one of :data:`BACKENDS`: ``"auto"`` (numba on the CPU when available, else torch),
            ``"numba"``, ``"torch"`` (eager, the reference) or ``"compile"`` (torch.compile).

    Fields: ``columns`` (:class:`ShiftedMoments` [m, F] over the samples), ``row_std_sum`` and
    ``row_var_sum`` ([F], Σ_i std_j and Σ_i var_j). Memory: (3m + 2)·F·8 bytes.
    """

    reductions: ClassVar[dict[str, str]] = {"columns": "state", "row_std_sum": "sum", "row_var_sum": "sum"}

    def __init__(self, m: int, num_features: int, device: torch.device | str = "cpu", backend: str = "auto"):
        if m < 2:
            raise ValueError(f"the transformation set must have at least 2 transformations, got m={m}")
        device = torch.device(device)
        self.backend = "numba" if use_numba(backend, device) else "compile" if backend == "compile" else "torch"
        self.m = m
        self.num_features = num_features
        self.device = device
        self.columns = ShiftedMoments((m, num_features), device, fused=self.backend == "numba")
        self.row_std_sum = torch.zeros(num_features, dtype=torch.float64, device=device)
        self.row_var_sum = torch.zeros(num_features, dtype=torch.float64, device=device)

    @property
    def n(self) -> int:
        """Samples accumulated."""
        return self.columns.n

    # ------------------------------------------------------------------ updates
    def update(self, block: torch.Tensor, above: tuple[np.ndarray, np.ndarray] | None = None) -> int:
        """Add a block of rows: ``block`` [b, m, F] (or [b, m, ...], flattened here).

        ``above`` = (thresholds [F] of the block's dtype, counts [F] int64), numba backend only:
        the same read of the block also adds to ``counts`` the values above the thresholds (how
        :class:`~.goodfellow_states.GoodfellowCounts` shares it). Returns how many values were
        NaN or ±inf when counting, else 0."""
        b = block.shape[0]
        block = self._rows(block)
        cols = self.columns
        if self.backend in ("torch", "compile"):
            if above is not None:
                raise ValueError("STMoments.update: counting needs the numba backend")
            cols.start(block[0])
            update = _torch_update if self.backend == "torch" else _compiled_update()
            update(block, cols.shift, cols.s1, cols.s2, self.row_std_sum, self.row_var_sum, self.m)
            cols.n += b
            return 0
        limit, counts = above if above is not None else (_NO_LIMIT[block.dtype], _NO_COUNTS)
        cols.start(block[0])
        bad = _fused_update(
            np.ascontiguousarray(block.numpy()),
            cols.shift.numpy(),
            cols.s1.numpy(),
            cols.s2.numpy(),
            self.row_std_sum.numpy(),
            self.row_var_sum.numpy(),
            limit,
            counts,
            _TILE,
        )
        cols.n += b
        return int(bad)

    def _rows(self, block: torch.Tensor) -> torch.Tensor:
        """``block`` as [b, m, F] float32/float64, its shape checked."""
        block = block.reshape(block.shape[0], self.m, -1)
        if block.shape[2] != self.num_features:
            raise ValueError(f"expected {self.num_features} activations per sample, got {block.shape[2]}")
        if block.dtype not in (torch.float32, torch.float64):
            block = block.float()
        return block

    def merge(self, other: STMoments) -> STMoments:
        """Add another state's samples to this one (exact; Chan-style shift change)."""
        if (other.m, other.num_features) != (self.m, self.num_features):
            raise ValueError("can only merge moments of the same layer shape and transformation count")
        return super().merge(other)

    # ------------------------------------------------------------------ results, float64 numpy [F]
    def is_finite(self) -> bool:
        """False if any activation seen so far was NaN or ±inf (they propagate into the row sums)."""
        return bool(torch.isfinite(self.row_var_sum).all())

    def transformational(self, stat: str = "std") -> np.ndarray:
        """TV per activation: mean over samples of the std (or var) over transformations."""
        total = self.row_std_sum if stat == "std" else self.row_var_sum
        return (total / self.n).cpu().numpy()

    def column_variance(self) -> np.ndarray:
        """[m, F]: unbiased variance over samples, per transformation and activation."""
        if self.n < 2:
            raise ValueError(f"the sample variance needs at least 2 samples, got n={self.n}")
        return self.columns.variance().cpu().numpy()

    def column_mean(self) -> np.ndarray:
        """[m, F]: mean over samples, per transformation and activation."""
        return self.columns.mean().cpu().numpy()

    def sample(self, stat: str = "std") -> np.ndarray:
        """SV per activation: mean over transformations of the std (or var) over samples."""
        cols = self.columns
        if self.backend == "numba" and cols.s1.is_contiguous() and cols.s2.is_contiguous():
            if cols.n < 2:
                raise ValueError(f"the sample variance needs at least 2 samples, got n={cols.n}")
            return _column_spread_mean(cols.s1.numpy(), cols.s2.numpy(), float(cols.n), stat == "std", _TILE)
        var = self.column_variance()
        return (np.sqrt(var) if stat == "std" else var).mean(axis=0)


@dataclass(frozen=True)
class Moments(StatSpec):
    """The ST moments of a layer (:class:`STMoments`): read by TV, SV, NV (element and channel
    mode), ANOVA and the squared-Euclidean distances, one state for all of them."""

    def build(self, layer: LayerInfo, context: PassContext, reference: Any = None) -> STMoments:
        return STMoments(context.m, layer.size, context.device, context.backend)
