"""The kernels on CPUs this machine is not, and built by another compiler.

Forcing the AVX2 path on an AVX-512 machine tests its arithmetic, but not that the process never executes an
instruction the CPU lacks (code built for another instruction set that runs anyway, for instance while the extension
loads) nor that the CPU's own report picks the path. qemu-x86_64 (user mode, QEMU 7.2+) emulates an AMD EPYC Milan
(AVX2, no AVX-512; and the same without BMI2) and an Intel Nehalem (SSE4.2, no AVX) and runs portability_check.py
inside. AVX-512 without VBMI2, which QEMU cannot emulate, is checked in the compiled code. And the kernel built by
clang (the source has a clang branch for its per-function targets) must equal dense on every instruction set, as
GCC's build does.
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
from portability_check import CHECKS_PER_ISA  # tests/sparse is on sys.path (pytest's rootdir-less test folders)

REPO = Path(__file__).resolve().parents[2]
CHECK = Path(__file__).with_name("portability_check.py")

# qemu's CPU model, torch's own report there, the instruction set the kernel must choose, and all it may offer.
# The AVX2 kernels use BMI2 too (rorx): a CPU (or a VM's CPU model) with AVX2 but without BMI2 must take C++.
CPUS = [
    ("EPYC-Milan", "AVX2", "avx2", ["avx2", "cpp", "torch"]),
    ("EPYC-Milan,-bmi2", "AVX2", "cpp", ["cpp", "torch"]),
    ("Nehalem", "DEFAULT", "cpp", ["cpp", "torch"]),
]
# Switches that would make a child choose otherwise than by the CPU (torch's ATEN_CPU_CAPABILITY caps its report)
SWITCHES = ("ATP_SPARSE_ISA", "ATP_SPARSE_PATH", "ATP_SPARSE_KERNEL", "ATP_SPARSE_AMX", "ATEN_CPU_CAPABILITY")


def on_x86_linux() -> bool:
    return sys.platform == "linux" and platform.machine() == "x86_64"


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without the kernel switches (the child must choose by itself), the repo importable."""
    env = {k: v for k, v in os.environ.items() if k not in SWITCHES}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def tool_or_skip(name: str, package: str) -> str:
    """The path of `name`, after skipping where this test cannot run: not x86-64 Linux, the tool missing, or no
    C++ kernel built here with the default compiler (the emulated processes only load that build)."""
    if not on_x86_linux():
        pytest.skip("the kernel's instruction sets are x86-64's (and QEMU here emulates x86-64 on x86-64)")
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed (apt install {package})")
    if kernels.get() is None:
        pytest.skip(f"no C++ kernel with the default compiler: {kernels.reason()}")
    return path


def run_check(command: list[str], env: dict[str, str], label: str) -> dict:
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    errors = "\n".join(line for line in result.stderr.splitlines() if "TCG doesn't support" not in line)
    if result.returncode < 0:  # killed by a signal: SIGILL is an instruction this CPU lacks
        pytest.fail(f"{label}: killed by {signal.Signals(-result.returncode).name}\n{errors[-3000:]}")
    assert result.returncode == 0, f"{label}: exit {result.returncode}\n{errors[-3000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("cpu,torch_reports,expected,supported", CPUS, ids=[cpu for cpu, *_ in CPUS])
def test_kernel_on_an_emulated_cpu_picks_its_instruction_set_and_matches_dense(cpu, torch_reports, expected,
                                                                               supported):
    qemu = tool_or_skip("qemu-x86_64", "qemu-user")
    env = clean_env()
    # torch alone first: a qemu without AVX2 (before 7.2), or a torch or numpy that needs more than this CPU has,
    # is no fault of the kernel
    probe = subprocess.run([qemu, "-cpu", cpu, sys.executable, "-c",
                            "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                           capture_output=True, text=True, env=env, timeout=300)
    if probe.returncode != 0 or probe.stdout.strip() != torch_reports:
        pytest.skip(f"torch alone under this qemu as {cpu}: exit {probe.returncode}, {probe.stdout.strip()!r} "
                    f"(expected {torch_reports!r}; QEMU 7.2 or later emulates AVX2)")
    report = run_check([qemu, "-cpu", cpu, sys.executable, str(CHECK)], env, cpu)
    assert report["isa"] == expected and report["supported"] == supported
    assert report["checked"] == [expected] and report["checks"] == CHECKS_PER_ISA


def test_kernel_built_by_clang_matches_dense_on_every_instruction_set(tmp_path):
    """clang outlines an OpenMP loop's body into a function without the enclosing target region's features, so
    intrinsics written straight in such a loop do not compile there (GCC accepts them): the build failed and left
    users of clang the pure-PyTorch path. Built here into a fresh extension folder with CXX=clang++."""
    clang = tool_or_skip("clang++", "clang libomp-dev")
    program = tmp_path / "omp.cpp"
    program.write_text("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
    probe = subprocess.run([clang, "-fopenmp", str(program), "-o", str(tmp_path / "omp")], capture_output=True,
                           text=True, timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"clang++ cannot build OpenMP code here (apt install libomp-dev): {probe.stderr.strip()[:200]}")
    report = run_check([sys.executable, str(CHECK), "--every-isa"],
                       clean_env(CXX=clang, TORCH_EXTENSIONS_DIR=str(tmp_path / "extensions")), "clang build")
    assert report["module"] is not None, f"clang's build failed: {report['reason']}"
    assert Path(report["module"]).is_relative_to(tmp_path)
    compiler_line = next(line for line in (Path(report["module"]).parent / "build.ninja").read_text().splitlines()
                         if line.startswith("cxx = "))
    assert compiler_line.split()[-1] == clang  # built by clang (after any ccache wrapper), not the default compiler
    assert report["supported"] == kernels.supported_isas() and report["checked"] == report["supported"]
    assert report["checks"] == CHECKS_PER_ISA * len(report["supported"])


# Instructions of AVX-512 VBMI2, which Skylake-SP and Cascade Lake lack
VBMI2_MNEMONICS = ("vpexpandb", "vpexpandw", "vpcompressb", "vpcompressw", "vpshld", "vpshrd")
# Code that runs only where VBMI2 is in use: the 16-bit instantiations and the AMX path (has_amx needs VBMI2)
NEEDS_VBMI2 = ("c10::BFloat16", "c10::Half", "amx", "write_tiles")


def test_avx512_code_that_runs_without_vbmi2_holds_no_vbmi2_instruction():
    """AVX-512 without VBMI2 (Skylake-SP, Cascade Lake: common in clusters) cannot be emulated (QEMU has no
    AVX-512), so the compiled code is read instead: the AVX-512 region is compiled with VBMI2 allowed for the 16-bit
    expand-loads, and there 16-bit values take the AVX2 kernels; no other function may hold a VBMI2 instruction (on
    any register width), or such a CPU dies of SIGILL on fp32."""
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
    without_vbmi2 = {n: code for n, code in functions.items() if not any(tag in n for tag in NEEDS_VBMI2)}
    assert any("decode_rows_avx512<float>" in n and any("zmm" in op for op in code)  # found the fp32 kernels
               for n, code in without_vbmi2.items()), sorted(functions)[:50]
    offending = {n: sorted({op.split()[0] for op in code if op.startswith(VBMI2_MNEMONICS)})
                 for n, code in without_vbmi2.items()}
    assert not {n: ops for n, ops in offending.items() if ops}
    assert any(op.startswith(VBMI2_MNEMONICS) for code in functions.values() for op in code)  # the reading sees them
