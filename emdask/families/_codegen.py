"""How the compiled kernels are generated: vectors of the CPU's full width.

LLVM, which numba compiles with, holds its vectorised loops to 256-bit registers on most
CPUs with 512-bit ones (AVX-512): on the first such CPUs, wide instructions lowered the clock.
On current ones they do not, and emdask's kernels (long loops of multiply-adds along the
rows) run 10-15% faster with 512-bit vectors. So, on a CPU with AVX-512, emdask asks numba
for its host's features less the 256-bit preference, before numba is first imported (numba
reads its settings then).

Nothing is changed when numba was imported already, when ``NUMBA_CPU_NAME`` or
``NUMBA_CPU_FEATURES`` are set, when ``NUMBA_ENABLE_AVX=0``, or with
``EMDASK_WIDE_VECTORS=0``. Results are the same either way to rounding (sums taken in
another order); compiled kernels are cached per feature set, so neither setting reuses the
other's.
"""

from __future__ import annotations

import os
import sys

_DONE = []


def prefer_wide_vectors() -> bool:
    """Ask numba for full-width vectors where that applies (see the module's text); whether
    it was asked, in this process. Call before numba is imported; later calls do nothing."""
    if _DONE:
        return _DONE[0]
    _DONE.append(_configure())
    return _DONE[0]


def _configure() -> bool:
    env = os.environ
    if "numba" in sys.modules or env.get("EMDASK_WIDE_VECTORS", "1") == "0":
        return False
    if env.get("NUMBA_CPU_NAME") or env.get("NUMBA_CPU_FEATURES"):
        return False
    if env.get("NUMBA_ENABLE_AVX", "1") == "0":
        return False
    try:
        import llvmlite.binding as ll

        features = ll.get_host_cpu_features()
    except Exception:  # no llvmlite (numba is not installed) or no answer from LLVM
        return False
    if not features.get("avx512f"):
        return False
    env["NUMBA_CPU_FEATURES"] = features.flatten() + ",-prefer-256-bit"
    return True
