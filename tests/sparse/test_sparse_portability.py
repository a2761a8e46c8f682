"""The kernels on CPUs this machine is not, and built by another compiler.

Forcing the AVX2 path on an AVX-512 machine tests its arithmetic, but not that the process never executes an
instruction the CPU lacks (code built for another instruction set that runs anyway, for instance while the extension
loads) nor that the CPU's own report picks the path. qemu-x86_64 (user mode, QEMU 7.2+) emulates an AMD EPYC Milan
(AVX2, no AVX-512) and an Intel Nehalem (SSE4.2, no AVX) and runs portability_check.py inside. AVX-512 without
VBMI2, which QEMU cannot emulate, is checked in the compiled code. And the kernel built by clang (the source has a
clang branch for its per-function targets) must give the same results as GCC's on every instruction set.
Each part skips where its tool is missing (`apt install qemu-user clang libomp-dev`; .ci/run installs them)."""
from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lib.sparse import kernels

REPO = Path(__file__).resolve().parents[2]
CHECK = Path(__file__).with_name("portability_check.py")
CHECKS_PER_ISA = 32  # portability_check.CHECKS_PER_ISA: 2 policies x 2 dtypes x 2 shapes x 4 token counts

# qemu's CPU model, the instruction set the kernel must choose there, and all it may offer
CPUS = [
    ("EPYC-Milan", "avx2", ["avx2", "cpp", "torch"]),
    ("Nehalem", "cpp", ["cpp", "torch"]),
]


def on_x86_linux() -> bool:
    return sys.platform == "linux" and platform.machine() == "x86_64"


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without the kernel switches (the child must choose by itself), the repo importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("ATP_SPARSE_ISA", "ATP_SPARSE_PATH", "ATP_SPARSE_KERNEL")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run_check(command: list[str], env: dict[str, str], label: str) -> dict:
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    errors = "\n".join(line for line in result.stderr.splitlines() if "TCG doesn't support" not in line)
    if result.returncode < 0:  # killed by a signal: SIGILL is an instruction this CPU lacks
        pytest.fail(f"{label}: killed by {signal.Signals(-result.returncode).name}\n{errors[-3000:]}")
    assert result.returncode == 0, f"{label}: exit {result.returncode}\n{errors[-3000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("cpu,expected,supported", CPUS, ids=[cpu for cpu, _, _ in CPUS])
def test_kernel_on_an_emulated_cpu_picks_its_instruction_set_and_matches_dense(cpu, expected, supported):
    qemu = shutil.which("qemu-x86_64") if on_x86_linux() else None
    if qemu is None:
        pytest.skip("qemu-x86_64 not installed (apt install qemu-user)")
    if kernels.get() is None:
        pytest.skip(f"no C++ kernel: {kernels.reason()}")  # built here, natively: the emulated process only loads it
    env = clean_env()
    if expected == "avx2":
        probe = subprocess.run([qemu, "-cpu", cpu, sys.executable, "-c",
                                "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                               capture_output=True, text=True, env=env, timeout=300)
        if probe.returncode != 0 or "AVX2" not in probe.stdout:
            pytest.skip(f"this qemu does not emulate AVX2 (needs 7.2 or later): {probe.stdout.strip()!r}")
    report = run_check([qemu, "-cpu", cpu, sys.executable, str(CHECK)], env, cpu)
    assert report["isa"] == expected and report["supported"] == supported
    assert report["checked"] == [expected] and report["checks"] == CHECKS_PER_ISA


def test_kernel_built_by_clang_matches_dense_on_every_instruction_set(tmp_path):
    """clang outlines an OpenMP loop's body into a function without the enclosing target region's features, so
    intrinsics written straight in such a loop do not compile there (GCC accepts them): the build failed and left
    users of clang the pure-PyTorch path. Built here into a fresh extension folder with CXX=clang++."""
    clang = shutil.which("clang++")
    if clang is None or not on_x86_linux():
        pytest.skip("clang++ not installed (apt install clang libomp-dev)")
    if kernels.get() is None:
        pytest.skip(f"no C++ kernel with the default compiler either: {kernels.reason()}")
    report = run_check([sys.executable, str(CHECK), "--every-isa"],
                       clean_env(CXX=clang, TORCH_EXTENSIONS_DIR=str(tmp_path)), "clang build")
    assert report["module"] is not None and Path(report["module"]).is_relative_to(tmp_path)
    ninja = (Path(report["module"]).parent / "build.ninja").read_text()
    assert f"cxx = {clang}" in ninja  # built by clang, not by the default compiler
    assert report["supported"] == kernels.supported_isas() and report["checked"] == report["supported"]
    assert report["checks"] == CHECKS_PER_ISA * len(report["supported"])


# Instructions of AVX-512 VBMI2, which Skylake-SP and Cascade Lake lack
VBMI2_MNEMONICS = ("vpexpandb", "vpexpandw", "vpcompressb", "vpcompressw", "vpshld", "vpshrd")
# Code that runs only where VBMI2 is in use: the 16-bit instantiations and the AMX path (has_amx needs VBMI2)
NEEDS_VBMI2 = ("c10::BFloat16", "c10::Half", "amx", "write_tiles")


def test_avx512_code_that_runs_without_vbmi2_holds_no_vbmi2_instruction():
    """AVX-512 without VBMI2 (Skylake-SP, Cascade Lake: common in clusters) cannot be emulated (QEMU has no
    AVX-512), so the compiled code is read instead: the AVX-512 region is compiled with VBMI2 allowed for the 16-bit
    expand-loads, and there 16-bit values take the AVX2 kernels; any other function using zmm registers must hold
    no VBMI2 instruction, or such a CPU dies of SIGILL on fp32."""
    objdump = shutil.which("objdump")
    kern = kernels.get()
    if objdump is None or kern is None or not on_x86_linux():
        pytest.skip("needs the C++ kernel on x86-64 Linux and objdump")
    listing = subprocess.run([objdump, "-d", "--no-show-raw-insn", "-C", kern.__file__], capture_output=True,
                             text=True, check=True, timeout=120).stdout
    functions: dict[str, list[str]] = {}
    name = None
    for line in listing.splitlines():
        if line.endswith(">:") and " <" in line:
            name = line.split(" <", 1)[1][:-2]
            functions[name] = []
        elif name is not None and "\t" in line:
            functions[name].append(line.split("\t", 1)[1].strip())
    avx512 = {n: code for n, code in functions.items() if any("zmm" in op for op in code)}
    without_vbmi2 = {n: code for n, code in avx512.items() if not any(tag in n for tag in NEEDS_VBMI2)}
    assert any("decode_rows_avx512<float>" in n for n in without_vbmi2), sorted(avx512)  # found the fp32 kernels
    offending = {n: sorted({op.split()[0] for op in code if op.startswith(VBMI2_MNEMONICS)})
                 for n, code in without_vbmi2.items()}
    assert not {n: ops for n, ops in offending.items() if ops}
    assert any(op.startswith(VBMI2_MNEMONICS) for n, code in avx512.items() for op in code)  # the reading sees them
