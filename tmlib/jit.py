"""numba, imported in one place, configured before any of tmlib's kernels runs.

Two settings must be made before numba's first parallel kernel, whichever module of tmlib runs
first (the warps of :mod:`tmlib.warp_kernels` or the statistics of :mod:`tmlib.measures`):

* the size of its thread pool. numba's OpenMP threading layer does not honour
  ``numba.set_num_threads`` (measured: a process with torch and numba set to 1 thread used 13.3 s
  of CPU in 7.4 s), so its pool is fixed at import by ``NUMBA_NUM_THREADS`` (default: every core).
  Where that is unset but ``OMP_NUM_THREADS`` is set, as torchrun does for every rank, numba
  follows it: W ranks on a machine then use W·k threads, not W times every core.
* the threading layer: numba's OpenMP pool first. Handing the cores back and forth between
  torch's OpenMP threads and numba's own workqueue pool cost 30-40 % of the forward time in
  benchmarks/bench_engine.py.

numba is a pinned dependency; every kernel has a torch fallback (and the torch ops are the path
on other devices), so a broken install runs slower, not wrong.
"""

from __future__ import annotations

import os

__all__ = ["HAVE_NUMBA", "fma", "numba"]

if "NUMBA_NUM_THREADS" not in os.environ and os.environ.get("OMP_NUM_THREADS", "").isdigit():
    os.environ["NUMBA_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"]

try:
    import numba

    numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]
    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only in broken installs
    numba = None
    HAVE_NUMBA = False

fma = None
if HAVE_NUMBA:
    from numba.extending import intrinsic

    @intrinsic
    def fma(typingctx, a, b, c):  # pragma: no cover - compiled into the kernels
        """a·b + c rounded once, in a numba kernel (LLVM's fma: one instruction where the CPU has it)."""
        def codegen(context, builder, signature, args):
            return builder.fma(*args)
        return a(a, b, c), codegen
