"""Host ISA detection on recorded /proc/cpuinfo samples (tests/fixtures/cpuinfo/)."""

from pathlib import Path

import pytest

from edgemm import hostinfo

SAMPLES = Path(__file__).resolve().parents[1] / "fixtures" / "cpuinfo"


def info(name: str, machine: str = "x86_64") -> dict:
    return hostinfo.cpu_info((SAMPLES / name).read_text(), machine=machine)


def test_sapphire_rapids_has_amx_bf16_fp16_and_vnni():
    cpu = info("intel_xeon_sapphire_rapids.txt")
    assert cpu["model"] == "Intel(R) Xeon(R) Platinum 8488C"
    assert {"amx_tile", "amx_int8", "amx_bf16", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni",
            "avx2", "fma"} <= set(cpu["isa"])
    assert cpu["amx"] and cpu["bf16"] and cpu["vnni"]


def test_this_sessions_amd_epyc_has_avx512_bf16_and_vnni_but_no_amx_or_fp16():
    cpu = info("amd_epyc_avx512_vnni.txt")
    assert cpu["model"] == "AMD EPYC"
    assert {"avx512_bf16", "avx512_vnni", "avx_vnni", "avx512f", "avx2", "fma"} <= set(cpu["isa"])
    assert not {"amx_tile", "amx_int8", "amx_bf16", "avx512_fp16"} & set(cpu["isa"])
    assert cpu["bf16"] and cpu["vnni"] and not cpu["amx"]


def test_haswell_has_avx2_fma_only():
    cpu = info("intel_xeon_haswell_avx2.txt")
    assert cpu["isa"] == ["avx2", "fma"]
    assert not cpu["vnni"] and not cpu["bf16"] and not cpu["amx"]


def test_jetson_orin_a78ae_has_dot_product_and_fp16_but_no_i8mm_bf16_or_sve():
    cpu = info("jetson_orin_cortex_a78ae.txt", machine="aarch64")
    assert cpu["model"] == "Arm Cortex-A78AE (Jetson Orin)"   # named from CPU part (no model name on Arm)
    assert cpu["isa"] == ["asimddp", "asimdhp"]
    assert cpu["vnni"] and not cpu["bf16"]


@pytest.mark.parametrize("name, core, extra", [
    ("graviton3_neoverse_v1.txt", "Neoverse V1", set()),
    ("graviton4_neoverse_v2.txt", "Neoverse V2", {"sve2"}),
])
def test_graviton_has_i8mm_bf16_sve(name, core, extra):
    cpu = info(name, machine="aarch64")
    assert core in cpu["model"]
    assert {"asimddp", "i8mm", "bf16", "sve", "svei8mm", "svebf16"} | extra <= set(cpu["isa"])
    assert ("sve2" in cpu["isa"]) == bool(extra)
    assert cpu["bf16"] and cpu["vnni"] and not cpu["amx"]


def test_flag_names_match_whole_words_only():
    # "sve2" must not make "sve" present, nor "avx512_bf16" make "bf16"; the first processor's flags count.
    text = "processor : 0\nflags : avx512_bf16 sve2x\n\nprocessor : 1\nflags : amx_tile\n"
    assert hostinfo.host_isa(text) == frozenset({"avx512_bf16"})


def test_no_cpuinfo_means_no_features(monkeypatch, tmp_path):
    monkeypatch.setattr(hostinfo, "CPUINFO", tmp_path / "missing")
    assert hostinfo.host_isa() == frozenset()
    assert hostinfo.cpu_info()["isa"] == []


def test_variants_carried_only_for_hosts_no_earlier_variant_serves():
    from edgemm.quant.cpu_engines import X86_BF16, _serves_new_hosts
    from edgemm.hostinfo import INT8_DOT

    int8 = sorted(INT8_DOT)
    # an INT8 (VNNI) variant after a BF16 one: serves VNNI hosts without BF16 (Ice Lake, Orin, Graviton2)
    assert _serves_new_hosts(int8, [list(X86_BF16)])
    # a BF16 variant after an INT8 one adds nothing: every AVX512-BF16/AMX part also has VNNI
    assert not _serves_new_hosts(list(X86_BF16), [int8])
    # an FP32 variant (needs nothing) serves AVX2-only hosts, unless a needs-nothing variant is carried
    assert _serves_new_hosts([], [int8])
    assert not _serves_new_hosts(int8, [[]])
