"""Loading the C++ kernels (kernel.cpp) and choosing their instruction set at run time.

The extension is built on first use with torch.utils.cpp_extension (about a minute) and cached in torch's extension
directory (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions), so later processes only load it. It is compiled
for the baseline x86-64 with -O3 -fopenmp, not -march=native: the SIMD code sits in functions compiled for their own
instruction set, and the extension picks one at run time from what the CPU reports:

* ``avx512``: AVX-512 F/BW/VL/DQ + BMI2 (Intel Skylake-SP and later, AMD Zen 4 and later): expand-loads; bf16 and
  fp16 values also need VBMI2 (Ice Lake and later, Zen 4 and later), without it they take the AVX2 kernels;
* ``avx2``: AVX2 + FMA + BMI2 (Intel Haswell and later, AMD Zen): byte-table permutes;
* ``cpp``: portable C++ (any CPU the compiler targets);
* ``torch``: no C++ at all, SparseLinear's pure-PyTorch path (correct, slow: it unpacks the weight every call).

``ATP_SPARSE_ISA=avx512|avx2|cpp|torch`` (or :func:`set_isa`) forces one; asking for one the CPU lacks prints one line
and uses the best it has. ``ATP_SPARSE_AMX=off`` (or :func:`set_amx`) keeps bf16 off the AMX path on a CPU that has
it (bf16 then takes the tiled kernel, as on AVX-512 CPUs without AMX). When the build cannot run (no compiler, a
failing one, ATP_SPARSE_KERNEL=off) one line is printed on stderr and `get()` returns None: SparseLinear then uses
its pure-PyTorch path.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import platform
import re
import sys
import threading

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernel.cpp")


def kernel_name(source: str = _SOURCE) -> str:
    """The extension's name in torch's cache: the kernel's version, a digest of its source and the machine type.
    The digest gives an edited kernel.cpp a build folder of its own (torch would rebuild in the old one, with no
    word about the minute it takes, and a copy of the repository at another version would rebuild it again); the
    machine type, because torch's cache does not separate architectures and a home directory shared by x86-64 and
    Arm nodes would otherwise hand one the other's build."""
    try:
        with open(source, "rb") as handle:
            digest = hashlib.sha256(handle.read()).hexdigest()[:12]
    except OSError:  # no source: the build fails and says so; the name only has to be a name
        digest = "nosource"
    return f"atp_sparse_bitmask_v32_{digest}_" + re.sub(r"\W", "_", platform.machine() or "unknown")


KERNEL_NAME = kernel_name()
ISA_CODES = {"cpp": 0, "avx2": 1, "avx512": 2}
ISA_NAMES = ("avx512", "avx2", "cpp", "torch")  # best first
ISA_LABELS = {"avx512": "AVX-512", "avx2": "AVX2", "cpp": "portable C++", "torch": "pure PyTorch"}
_UNSET = object()
_module = _UNSET
_reason: str | None = None
_lock = threading.Lock()
_isa = "torch"      # the instruction set in use (set when the module loads, or by set_isa)
ISA_CODE = 0        # its code, read by SparseLinear.forward on every call
_use_kernel = True  # False when the isa is "torch"
_amx_enabled = os.environ.get("ATP_SPARSE_AMX", "").strip().lower() not in ("off", "0", "no", "false")


def _cpp_extension():
    """torch.utils.cpp_extension, imported without its one line about CUDA: a CUDA build of torch on a machine with a
    CUDA toolkit but no GPU (a cluster's login node) says at import that it found no CUDA runtime (a logged warning
    in 2.13-2.15, a print to stderr in 2.6), on every process that loads these kernels, which are CPU code and
    never use CUDA. Anything else it writes to stderr is passed on."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed):
            import torch.utils.cpp_extension as cpp_extension
    finally:
        logger.setLevel(level)
        sys.stderr.write("".join(line for line in printed.getvalue().splitlines(keepends=True)
                                 if not line.startswith("No CUDA runtime is found")))
    return cpp_extension


def _build():
    flags = ["-O3", "-fopenmp"]
    return _cpp_extension().load(name=KERNEL_NAME, sources=[_SOURCE], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                                 verbose=False)


def _built_before() -> bool:
    """Whether torch's extension cache already holds a build of the kernel (then loading takes a second)."""
    try:
        folder = _cpp_extension()._get_build_directory(KERNEL_NAME, verbose=False)
    except Exception:  # noqa: BLE001 - only decides whether to announce a slow build
        return False
    return any(name.endswith(".so") for name in os.listdir(folder)) if os.path.isdir(folder) else False


def _requested() -> str:
    value = os.environ.get("ATP_SPARSE_ISA", "").strip().lower()
    return value or "auto"


def _choose(module, requested: str) -> str:
    best = {2: "avx512", 1: "avx2", 0: "cpp"}[int(module.best_isa())] if module is not None else "torch"
    if requested in ("", "auto"):
        return best
    if requested not in ISA_NAMES:
        print(f"atp sparse: ATP_SPARSE_ISA={requested!r} is not one of auto, {', '.join(ISA_NAMES)}; using {best}",
              file=sys.stderr, flush=True)
        return best
    if requested != "torch" and (module is None or ISA_NAMES.index(requested) < ISA_NAMES.index(best)):
        print(f"atp sparse: this CPU cannot run the {requested} kernel; using {best}", file=sys.stderr, flush=True)
        return best
    return requested


def _activate(name: str) -> None:
    global _isa, ISA_CODE, _use_kernel
    _isa = name
    ISA_CODE = ISA_CODES.get(name, 0)
    _use_kernel = name != "torch"


def get():
    """The compiled kernel module, or None when it cannot be built (said once) or the isa is 'torch'."""
    if _module is not _UNSET:
        return _module if _use_kernel else None
    with _lock:
        if _module is _UNSET:
            _load()
    return _module if _use_kernel else None


def _load() -> None:
    global _module, _reason
    requested = _requested()
    if os.environ.get("ATP_SPARSE_KERNEL", "").lower() in ("off", "0", "no", "false"):
        _reason = "disabled by ATP_SPARSE_KERNEL"
        _module = None
    elif requested == "torch":
        _reason = "ATP_SPARSE_ISA=torch"
        _module = None
    else:
        try:
            if not _built_before():
                print("atp sparse: building the C++ kernel (first use on this machine, about a minute)...",
                      file=sys.stderr, flush=True)
            _module = _build()
        except Exception as error:  # a missing/failing compiler, ninja, headers: never fatal
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            _reason = f"{type(error).__name__}: {lines[0] if lines else 'build failed'}"[:200]
            _module = None
    if _module is None and requested != "torch":
        print(f"atp sparse: C++ kernel unavailable ({_reason}); using the pure-PyTorch path (slow)",
              file=sys.stderr, flush=True)
    _activate(_choose(_module, requested))


def available() -> bool:
    return get() is not None


def reason() -> str | None:
    """Why the kernel is unavailable (None when it loaded or was not tried yet)."""
    return _reason


def isa() -> str:
    """The instruction set SparseLinear uses: 'avx512', 'avx2', 'cpp' or 'torch' (loads the kernel if needed)."""
    get()
    return _isa


def supported_isas() -> list[str]:
    """Every instruction set this machine can run here, best first ('torch' always)."""
    get()
    if _module is None:
        return ["torch"]
    best = {2: "avx512", 1: "avx2", 0: "cpp"}[int(_module.best_isa())]
    return list(ISA_NAMES[ISA_NAMES.index(best):])


def has_amx() -> bool:
    """The bf16 `amx` path is usable: the CPU has AMX-BF16, the OS granted this process the tile state, and it was
    not switched off (ATP_SPARSE_AMX=off, set_amx(False))."""
    module = get()
    return bool(_amx_enabled and module is not None and module.has_amx())


def set_amx(enabled: bool) -> bool:
    """Allow (True) or forbid (False) the AMX path from now on (tests, benchmarks); returns the previous setting.
    SparseLinear keys its measured choices by the candidate paths, so choices made with AMX are not reused."""
    global _amx_enabled
    previous, _amx_enabled = _amx_enabled, bool(enabled)
    return previous


def set_isa(name: str) -> str:
    """Use another instruction set from now on (tests, benchmarks); returns the previous one. ValueError when this
    machine cannot run it."""
    get()
    if name not in supported_isas():
        raise ValueError(f"instruction set {name!r} not available here (available: {', '.join(supported_isas())})")
    previous = _isa
    with _lock:
        _activate(name)
    return previous


def describe() -> str:
    """One line for summaries and benchmark records, e.g. 'C++ AVX-512 (OpenMP)'."""
    name = isa()
    if name == "torch":
        return f"pure PyTorch ({_reason or 'forced'})"
    if name == "avx512" and not _module.has_vbmi2():
        return "C++ AVX-512 (OpenMP; bf16/fp16 values on AVX2: no VBMI2)"
    return f"C++ {ISA_LABELS[name]} (OpenMP)"


def reset() -> None:
    """Forget the loaded/failed state (tests use it to retry the build under other conditions)."""
    global _module, _reason
    with _lock:
        _module = _UNSET
        _reason = None
        _activate("torch")
