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

The AVX2 batch-1 decode has two ways to expand 8 packed fp32 or bf16 values, with the same results: one 256-bit
cross-lane permute (cheap where it is one micro-op: Intel since Haswell) or two 128-bit in-lane shuffles (cheap on
cores that split 256-bit operations into halves, where the permute costs several: AMD Zen 1/Zen+). No CPU flag tells
them apart, so when the AVX2 kernel comes into use both are timed on a small matrix held in cache (about 20 ms, once
per process) and the faster kept (:func:`avx2_expand`; ``ATP_SPARSE_AVX2_EXPAND=permute|halves`` forces one).

On CPUs with AVX512_BF16 (Intel Cooper Lake and Sapphire Rapids on, AMD Zen 4 on) the tiled kernel and the decode
of 5 or more tokens for bf16 weights and bf16 inputs run on its dot products (two bf16 products per 32-bit lane;
:func:`has_bf16_dot`), where torch's dense bf16 GEMM runs on them too.

``ATP_SPARSE_ISA=avx512|avx2|cpp|torch`` (or :func:`set_isa`) forces one; asking for one the CPU lacks prints one line
and uses the best it has. ``ATP_SPARSE_AMX=off`` (or :func:`set_amx`) keeps bf16 off the AMX path on a CPU that has
it (bf16 then takes the tiled kernel, as on AVX-512 CPUs without AMX); ``ATP_SPARSE_BF16_DOT=off`` (or
:func:`set_bf16_dot`) keeps bf16 off the dot products (fp32 multiply-adds instead). When the build cannot run (no
compiler, a failing one, ATP_SPARSE_KERNEL=off) one line is printed on stderr and `get()` returns None: SparseLinear
then uses its pure-PyTorch path.
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
import time

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
    return f"atp_sparse_bitmask_v37_{digest}_" + re.sub(r"\W", "_", platform.machine() or "unknown")


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
# Bumped whenever the instruction set, VBMI2, AMX or the bf16 dot products are switched (or the module loads):
# SparseLinear keeps what it derives from them (its candidate paths) until this changes, instead of asking every call.
SETTINGS_VERSION = 0
_use_kernel = True  # False when the isa is "torch"
_OFF_WORDS = ("off", "0", "no", "false")
_amx_enabled = os.environ.get("ATP_SPARSE_AMX", "").strip().lower() not in _OFF_WORDS
EXPAND_WAYS = ("permute", "halves")  # the codes of set_avx2_expand
EXPAND_DTYPES = ("float32", "bfloat16")  # values dtypes with both ways (fp16 always permutes)
EXPAND_MARGIN = 0.95  # halves only when it took at most this share of the permute's time (the permute by default)
_expand: dict[str, str] = {}  # values dtype -> way, once the AVX2 kernel came into use
_expand_seconds: dict[str, dict[str, float]] = {}  # values dtype -> way -> best seconds of a call (measured)


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


def _env_word(variable: str, value: str, allowed: tuple[str, ...], otherwise: str) -> str | None:
    """An environment setting's word if it is one of `allowed`; None for '' and 'auto', and for anything else after
    one line on stderr saying what happens instead (`otherwise`)."""
    if value in ("", "auto"):
        return None
    if value not in allowed:
        print(f"atp sparse: {variable}={value!r} is not one of auto, {', '.join(allowed)}; {otherwise}",
              file=sys.stderr, flush=True)
        return None
    return value


def _choose(module, requested: str) -> str:
    best = {2: "avx512", 1: "avx2", 0: "cpp"}[int(module.best_isa())] if module is not None else "torch"
    requested = _env_word("ATP_SPARSE_ISA", requested, ISA_NAMES, f"using {best}")
    if requested is None:
        return best
    if requested != "torch" and (module is None or ISA_NAMES.index(requested) < ISA_NAMES.index(best)):
        print(f"atp sparse: this CPU cannot run the {requested} kernel; using {best}", file=sys.stderr, flush=True)
        return best
    return requested


def _settings_changed() -> None:
    global SETTINGS_VERSION
    SETTINGS_VERSION += 1


def _activate(name: str) -> None:
    global _isa, ISA_CODE, _use_kernel
    _settings_changed()
    _isa = name
    ISA_CODE = ISA_CODES.get(name, 0)
    _use_kernel = name != "torch"
    if _module not in (None, _UNSET) and _runs_avx2_decode(name) and not _expand:
        _choose_expand(_module)


def _runs_avx2_decode(name: str) -> bool:
    """Whether some decode runs the AVX2 kernel under this isa: AVX2 itself, or bf16 values on AVX-512 without
    VBMI2."""
    return name == "avx2" or (name == "avx512" and not _module.has_vbmi2())


def _requested_expand() -> str | None:
    return _env_word("ATP_SPARSE_AVX2_EXPAND", os.environ.get("ATP_SPARSE_AVX2_EXPAND", "").strip().lower(),
                     EXPAND_WAYS, "measuring")


def measure_expand(module, dtype_name: str, rounds: int = 7, calls: int = 5) -> dict[str, float]:
    """Best seconds of one AVX2 batch-1 decode call with each expansion way, on one thread (this compares a core's
    instructions; a parallel region's start would blur the difference): a 128 x 4096 matrix at 70% (0.6 MiB of
    packed fp32 values, in L2 or L3 on any CPU), the ways interleaved round by round so that a busy moment of a
    shared machine slows both. Leaves the permute set."""
    import torch  # here: loading the kernels needs no torch tensors

    from lib.sparse import format as fmt

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(128, 4096, generator=generator)
    weight = (weight * (torch.rand(128, 4096, generator=generator) < 0.3)).to(getattr(torch, dtype_name))
    packed = fmt.pack(weight)
    x = torch.randn(1, 4096, generator=generator)
    seconds = {way: float("inf") for way in EXPAND_WAYS}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(rounds):
            for code, way in enumerate(EXPAND_WAYS):
                module.set_avx2_expand(dtype_name, code)
                for _ in range(calls):
                    start = time.perf_counter()
                    module.linear(x, packed["mask"], packed["values"], packed["row_offsets"], None, 4096, 0,
                                  ISA_CODES["avx2"])
                    seconds[way] = min(seconds[way], time.perf_counter() - start)
    finally:
        module.set_avx2_expand(dtype_name, 0)
        torch.set_num_threads(threads)
    return seconds


def _choose_expand(module) -> None:
    forced = _requested_expand()
    for dtype_name in EXPAND_DTYPES:
        if forced is None:
            seconds = measure_expand(module, dtype_name)
            _expand_seconds[dtype_name] = seconds
            way = "halves" if seconds["halves"] <= EXPAND_MARGIN * seconds["permute"] else "permute"
        else:
            way = forced
        module.set_avx2_expand(dtype_name, EXPAND_WAYS.index(way))
        _expand[dtype_name] = way


def avx2_expand() -> dict:
    """How the AVX2 batch-1 decode expands each values dtype here ({} when the AVX2 kernel is not in use), with
    the measured seconds per call of each way (empty when ATP_SPARSE_AVX2_EXPAND forced it), for records."""
    get()
    return {dtype_name: {"way": way, "seconds": dict(_expand_seconds.get(dtype_name, {}))}
            for dtype_name, way in _expand.items()}


def set_avx2_expand(way: str, dtype_name: str | None = None) -> None:
    """Use one expansion way for the AVX2 batch-1 decode of one values dtype, or of both (tests, benchmarks)."""
    module = get()
    if way not in EXPAND_WAYS:
        raise ValueError(f"way must be one of {', '.join(EXPAND_WAYS)}, got {way!r}")
    if module is None:
        return
    with _lock:
        for name in ([dtype_name] if dtype_name else EXPAND_DTYPES):
            module.set_avx2_expand(name, EXPAND_WAYS.index(way))
            _expand[name] = way


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
    if os.environ.get("ATP_SPARSE_KERNEL", "").lower() in _OFF_WORDS:
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
    if _module is not None and os.environ.get("ATP_SPARSE_BF16_DOT", "").strip().lower() in _OFF_WORDS:
        _module.set_avx512_bf16(False)
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
    _settings_changed()
    return previous


def has_bf16_dot() -> bool:
    """The tiled kernel and the decode of 5+ tokens for bf16 weights and bf16 inputs run on AVX512_BF16's dot
    products: the AVX-512 kernel is in use, the CPU has AVX512_BF16 (and VBMI2), and they were not switched off
    (ATP_SPARSE_BF16_DOT=off, set_bf16_dot(False))."""
    module = get()
    return bool(module is not None and _isa == "avx512" and module.has_bf16_dot())


def set_bf16_dot(enabled: bool) -> bool:
    """Allow (True, where the CPU has it) or forbid (False) the dot-product kernels from now on (tests,
    benchmarks); returns the previous setting. SparseLinear keys its measured choices by it."""
    return _switch("set_avx512_bf16", enabled)


def set_vbmi2(enabled: bool) -> bool:
    """Run this CPU as one with (True, where it has it) or without (False) AVX-512 VBMI2 from now on: without it,
    bf16 and fp16 values take the AVX2 kernels and AMX and the dot products are off, as on Skylake-SP or Cascade
    Lake (tests); returns the previous setting."""
    return _switch("set_avx512_vbmi2", enabled)


def _switch(setter: str, enabled: bool) -> bool:
    """One of the extension's on/off switches (it returns the previous setting), then SETTINGS_VERSION bumped."""
    module = get()
    if module is None:
        return False
    previous = bool(getattr(module, setter)(bool(enabled)))
    _settings_changed()
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
        return f"C++ AVX-512 (OpenMP; bf16/fp16 values on AVX2: no VBMI2{_expand_note(('bfloat16',))})"
    if name == "avx2":
        return f"C++ AVX2 (OpenMP{_expand_note(EXPAND_DTYPES)})"
    if name == "avx512" and _module.has_bf16_dot():
        return "C++ AVX-512 (OpenMP; bf16 tiled and 5+ token decode on AVX512_BF16 dot products)"
    return f"C++ {ISA_LABELS[name]} (OpenMP)"


def _expand_note(dtype_names: tuple[str, ...]) -> str:
    """'; decode expands fp32 in halves, bf16 in halves' with the measured speed of the chosen way."""
    parts = []
    for dtype_name in dtype_names:
        way, seconds = _expand.get(dtype_name), _expand_seconds.get(dtype_name)
        if way is None:
            continue
        short = {"float32": "fp32", "bfloat16": "bf16"}[dtype_name]
        gain = f" {seconds['permute'] / seconds['halves']:.2f}x" if seconds and way == "halves" else ""
        parts.append(f"{short} {'halves' + gain if way == 'halves' else 'permute'}")
    return f"; decode expand: {', '.join(parts)}" if parts else ""


def reset() -> None:
    """Forget the loaded/failed state (tests use it to retry the build under other conditions)."""
    global _module, _reason
    with _lock:
        _module = _UNSET
        _reason = None
        _expand.clear()
        _expand_seconds.clear()
        _activate("torch")
