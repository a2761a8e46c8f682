"""Loading the C++ kernels (kernel.cpp), built on first use with torch.utils.cpp_extension and cached in torch's
extension directory (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions), so later processes only load them.

Compiled with -O3 -march=native -fopenmp: AVX2+FMA code where the CPU has it, a scalar path otherwise. When the
build cannot run (no compiler, a failing one, ATP_SPARSE_KERNEL=off) one line is printed on stderr and
`get()` returns None: SparseLinear then uses its pure-PyTorch path (correct, but slow: it unpacks the weight on
every call).
"""
from __future__ import annotations

import os
import sys
import threading

KERNEL_NAME = "atp_sparse_bitmask_v3"
_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernel.cpp")
_UNSET = object()
_module = _UNSET
_reason: str | None = None
_lock = threading.Lock()


def _build():
    from torch.utils.cpp_extension import load

    flags = ["-O3", "-march=native", "-fopenmp"]
    return load(name=KERNEL_NAME, sources=[_SOURCE], extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False)


def get():
    """The compiled kernel module (linear, spmv, spmm, densify, TILE), or None when it cannot be built (said once)."""
    global _module, _reason
    if _module is not _UNSET:
        return _module
    with _lock:
        if _module is not _UNSET:
            return _module
        if os.environ.get("ATP_SPARSE_KERNEL", "").lower() in ("off", "0", "no", "false"):
            _reason = "disabled by ATP_SPARSE_KERNEL"
            _module = None
        else:
            try:
                _module = _build()
            except Exception as error:  # a missing/failing compiler, ninja, headers: never fatal
                lines = [line.strip() for line in str(error).splitlines() if line.strip()]
                _reason = f"{type(error).__name__}: {lines[0] if lines else 'build failed'}"[:200]
                _module = None
        if _module is None:
            print(f"atp sparse: C++ kernel unavailable ({_reason}); using the pure-PyTorch path (slow)",
                  file=sys.stderr, flush=True)
        return _module


def available() -> bool:
    return get() is not None


def reason() -> str | None:
    """Why the kernel is unavailable (None when it loaded or was not tried yet)."""
    return _reason


def reset() -> None:
    """Forget the loaded/failed state (tests use it to retry the build under other conditions)."""
    global _module, _reason
    with _lock:
        _module = _UNSET
        _reason = None
