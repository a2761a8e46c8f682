"""Which CPU a benchmark ran on, for its record.

Cloud VMs often hide the model name ("Intel(R) Xeon(R) Processor"), and two such machines can differ in what
matters here: this project's sessions met one that exposes AMX and one (family 6, model 207) whose hypervisor does
not. So the record keeps what the CPU reports besides the name: vendor, family, model, stepping (on Arm: the
implementer and part codes), the instruction sets the kernels and torch choose between, and the cache sizes;
`likely_microarchitecture` names the generation from family and model where they are well known (a guess for the
reader, never used to choose a kernel: the kernels look at the instruction-set flags themselves).

`parse_cpuinfo` is pure (text in, dict out); `identity` reads /proc/cpuinfo and sysfs.
"""
from __future__ import annotations

import os
import platform

# Flags of /proc/cpuinfo that decide a path here or in torch: the kernels' instruction sets, bf16/fp16 support of
# AVX-512, the tile unit.
RELEVANT_FLAGS = ("avx2", "fma", "f16c", "popcnt", "bmi2", "avx512f", "avx512bw", "avx512vl", "avx512dq",
                  "avx512_vbmi2", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")

# (vendor, family) -> [(first model, last model, name)]: server generations as family/model report them.
_GENERATIONS = {
    ("GenuineIntel", 6): [(85, 85, "Skylake-SP / Cascade Lake / Cooper Lake"), (106, 106, "Ice Lake-SP"),
                          (108, 108, "Ice Lake-D"), (143, 143, "Sapphire Rapids"), (207, 207, "Emerald Rapids"),
                          (173, 173, "Granite Rapids"), (175, 175, "Sierra Forest")],
    ("AuthenticAMD", 23): [(0, 47, "Zen / Zen+"), (48, 63, "Zen 2"), (96, 127, "Zen 2")],
    ("AuthenticAMD", 25): [(0, 15, "Zen 3"), (32, 47, "Zen 3"), (64, 95, "Zen 3"), (16, 31, "Zen 4"),
                           (96, 127, "Zen 4"), (160, 175, "Zen 4c")],
    ("AuthenticAMD", 26): [(0, 79, "Zen 5"), (96, 127, "Zen 5")],
    # Arm cores report "CPU implementer" (0x41: Arm) and "CPU part" instead of family and model.
    ("Arm", 0x41): [(0xD0C, 0xD0C, "Neoverse N1"), (0xD40, 0xD40, "Neoverse V1"), (0xD49, 0xD49, "Neoverse N2"),
                    (0xD4F, 0xD4F, "Neoverse V2")],
}


def likely_microarchitecture(vendor: str, family: int | None, model: int | None) -> str | None:
    for first, last, name in _GENERATIONS.get((vendor, family), []):
        if model is not None and first <= model <= last:
            return name
    return None


def parse_cpuinfo(text: str) -> dict:
    """The first processor's fields of a /proc/cpuinfo text: name, vendor, family, model, stepping, the
    RELEVANT_FLAGS it has and the likely microarchitecture. On Arm, family and model are the implementer and part
    codes."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor is enough: a VM's vCPUs report the same
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())

    def number(key: str) -> int | None:
        try:
            return int(fields[key])
        except (KeyError, ValueError):
            return None

    flags = set(fields.get("flags", "").split())
    vendor = fields.get("vendor_id", "")
    family, model = number("cpu family"), number("model")
    if not vendor and "CPU implementer" in fields:  # Arm: implementer and part, in hexadecimal
        try:
            family, model = int(fields["CPU implementer"], 16), int(fields.get("CPU part", ""), 16)
            vendor = "Arm" if family == 0x41 else f"implementer {fields['CPU implementer']}"
        except ValueError:
            family, model = None, None
    return {"name": fields.get("model name", ""), "vendor": vendor, "family": family, "model": model,
            "stepping": number("stepping"), "flags": [f for f in RELEVANT_FLAGS if f in flags],
            "likely_microarchitecture": likely_microarchitecture(vendor, family, model)}


def cache_sizes(root: str = "/sys/devices/system/cpu/cpu0/cache") -> dict[str, str]:
    """CPU 0's caches as sysfs reports them, e.g. {'L1d': '48K', 'L2': '2048K', 'L3': '...'} ({} elsewhere)."""
    sizes: dict[str, str] = {}
    try:
        entries = sorted(e for e in os.listdir(root) if e.startswith("index"))
    except OSError:
        return sizes
    for entry in entries:
        try:
            with open(os.path.join(root, entry, "level")) as f:
                level = f.read().strip()
            with open(os.path.join(root, entry, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(root, entry, "size")) as f:
                size = f.read().strip()
        except OSError:
            continue
        if kind == "Instruction":
            continue
        sizes[f"L{level}{'d' if kind == 'Data' else ''}"] = size
    return sizes


def identity() -> dict:
    """This machine's CPU for a benchmark record (parse_cpuinfo's fields and the caches); off Linux, the name
    platform gives and nothing else."""
    try:
        with open("/proc/cpuinfo") as f:
            info = parse_cpuinfo(f.read())
    except OSError:
        info = parse_cpuinfo("")
    info["name"] = info["name"] or platform.processor() or platform.machine()
    info["caches"] = cache_sizes()
    return info


def describe(info: dict) -> str:
    """One line: the name, then family/model with the likely generation and the vector extensions, e.g.
    'Intel(R) Xeon(R) Processor (family 6 model 207: Emerald Rapids, likely; AVX-512 with BF16, no AMX reported)'."""
    details = []
    if info.get("family") is not None and info.get("model") is not None:
        arm = info.get("vendor") == "Arm" or info.get("vendor", "").startswith("implementer")
        where = (f"implementer {info['family']:#x} part {info['model']:#x}" if arm
                 else f"family {info['family']} model {info['model']}")
        if info.get("likely_microarchitecture"):
            where += f": {info['likely_microarchitecture']}, likely"
        details.append(where)
    flags = set(info.get("flags", ()))
    if "avx512f" in flags:
        isa = "AVX-512" + (" with BF16" if "avx512_bf16" in flags else "")
        details.append(isa + (", AMX" if "amx_tile" in flags else ", no AMX reported"))
    elif "avx2" in flags:
        details.append("AVX2, no AVX-512")
    return info["name"] + (f" ({'; '.join(details)})" if details else "")
