"""The CPU record of the benchmarks (lib/sparse/cpu.py), on hand-written /proc/cpuinfo and sysfs texts."""
from lib.sparse import cpu

HIDDEN_NAME_XEON = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 207
model name\t: Intel(R) Xeon(R) Processor
stepping\t: 2
flags\t\t: fpu sse2 avx2 fma avx512f avx512dq avx512bw avx512vl avx512_vbmi2 avx512_bf16 avx512_fp16

processor\t: 1
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: another CPU
flags\t\t: amx_tile
"""

MILAN = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC 7B13
stepping\t: 1
flags\t\t: fpu sse2 avx avx2 fma bmi2
"""


def test_the_first_processor_is_read_with_the_flags_that_choose_a_path():
    info = cpu.parse_cpuinfo(HIDDEN_NAME_XEON)
    assert (info["vendor"], info["family"], info["model"], info["stepping"]) == ("GenuineIntel", 6, 207, 2)
    assert info["name"] == "Intel(R) Xeon(R) Processor"  # not the second processor's
    assert info["flags"] == ["avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vbmi2",
                             "avx512_bf16", "avx512_fp16"]
    assert info["likely_microarchitecture"] == "Emerald Rapids"
    assert cpu.describe(info) == ("Intel(R) Xeon(R) Processor (family 6 model 207: Emerald Rapids, likely; "
                                  "AVX-512 with BF16, no AMX reported)")


def test_an_avx2_only_epyc_and_the_tile_unit_are_named():
    info = cpu.parse_cpuinfo(MILAN)
    assert info["likely_microarchitecture"] == "Zen 3" and info["flags"] == ["avx2", "fma", "bmi2"]
    assert cpu.describe(info) == "AMD EPYC 7B13 (family 25 model 1: Zen 3, likely; AVX2, no AVX-512)"
    with_amx = cpu.parse_cpuinfo(HIDDEN_NAME_XEON.replace("model\t\t: 207", "model\t\t: 143", 1)
                                 .replace("avx512_fp16\n", "avx512_fp16 amx_bf16 amx_tile\n", 1))
    assert with_amx["likely_microarchitecture"] == "Sapphire Rapids"
    assert cpu.describe(with_amx).endswith("(family 6 model 143: Sapphire Rapids, likely; AVX-512 with BF16, AMX)")


GRAVITON2 = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x3
CPU part\t: 0xd0c
CPU revision\t: 1

processor\t: 1
CPU implementer\t: 0x61
"""


def test_an_arm_server_is_named_by_implementer_and_part():
    info = cpu.parse_cpuinfo(GRAVITON2)
    assert (info["vendor"], info["family"], info["model"]) == ("Arm", 0x41, 0xD0C)
    assert info["likely_microarchitecture"] == "Neoverse N1" and info["flags"] == []
    assert cpu.describe({**info, "name": "aarch64"}) == "aarch64 (implementer 0x41 part 0xd0c: Neoverse N1, likely)"
    other = cpu.parse_cpuinfo("CPU implementer\t: 0x61\nCPU part\t: 0x22\n")
    assert other["vendor"] == "implementer 0x61" and other["likely_microarchitecture"] is None
    assert cpu.parse_cpuinfo("CPU implementer\t: 0x41\nCPU part\t: none\n")["family"] is None


def test_unknown_or_missing_fields_give_no_guess():
    assert cpu.likely_microarchitecture("GenuineIntel", 6, 999) is None
    assert cpu.likely_microarchitecture("SomeVendor", 6, 207) is None
    info = cpu.parse_cpuinfo("")
    assert info["family"] is None and info["flags"] == [] and info["likely_microarchitecture"] is None
    assert cpu.describe({**info, "name": "arm64"}) == "arm64"
    odd = cpu.parse_cpuinfo("vendor_id : GenuineIntel\ncpu family : six\nmodel : 207\n")
    assert odd["family"] is None and odd["likely_microarchitecture"] is None


def test_cache_sizes_from_a_sysfs_tree(tmp_path):
    for index, (level, kind, size) in enumerate([(1, "Data", "48K"), (1, "Instruction", "32K"),
                                                 (2, "Unified", "2048K"), (3, "Unified", "266240K")]):
        folder = tmp_path / f"index{index}"
        folder.mkdir()
        (folder / "level").write_text(f"{level}\n")
        (folder / "type").write_text(f"{kind}\n")
        (folder / "size").write_text(f"{size}\n")
    assert cpu.cache_sizes(str(tmp_path)) == {"L1d": "48K", "L2": "2048K", "L3": "266240K"}
    assert cpu.cache_sizes(str(tmp_path / "absent")) == {}


def test_this_machine_is_described():
    info = cpu.identity()
    assert info["name"] and isinstance(info["caches"], dict)
    assert cpu.describe(info).startswith(info["name"])
