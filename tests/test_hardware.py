"""Chip detection: recorded ioreg, sysctl, /proc and device_info outputs parsed into Chips."""

import ast
import json
import re
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mlx_primitives.hardware import Chip, current_backend, detect_chip
from mlx_primitives.hardware.apple import (
    APPLE_CHIPS,
    detect_apple,
    parse_apple,
    parse_chip_name,
    parse_ioreg_gpu_cores,
    parse_sysctl,
    run_command,
)
from mlx_primitives.hardware.chip import BACKENDS
from mlx_primitives.hardware.cpu import clean_cpu_name, parse_cpu, parse_meminfo_total
from mlx_primitives.hardware.nvidia import family_from_sm, gpu_facts, parse_nvidia

DATA = Path(__file__).parent / "data" / "hardware"
HARDWARE_SOURCES = Path(__file__).parent.parent / "mlx_primitives" / "hardware"
SLUG = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
GiB = 1 << 30


def read(name):
    return (DATA / name).read_text()


def sysctl_of(machine):
    return parse_sysctl(read(f"apple_{machine}_sysctl.txt"))


# mx.device_info() on Metal, per machine of tests/data/hardware/apple_*.
APPLE_DEVICE_INFO = {
    "m1": {
        "device_name": "Apple M1",
        "architecture": "applegpu_g13g",
        "memory_size": 8 * GiB,
        "max_recommended_working_set_size": 5726633984,
        "max_buffer_length": 4294967296,
        "resource_limit": 499000,
    },
    "m2_pro": {
        "device_name": "Apple M2 Pro",
        "architecture": "applegpu_g14s",
        "memory_size": 32 * GiB,
        "max_recommended_working_set_size": 22906503168,
        "max_buffer_length": 17179869184,
        "resource_limit": 499000,
    },
    "m3_max": {
        "device_name": "Apple M3 Max",
        "architecture": "applegpu_g15s",
        "memory_size": 36 * GiB,
        "max_recommended_working_set_size": 28991029248,
        "max_buffer_length": 19327352832,
        "resource_limit": 499000,
    },
    "m4_max": {
        "device_name": "Apple M4 Max",
        "architecture": "applegpu_g16s",
        "memory_size": 128 * GiB,
        "max_recommended_working_set_size": 115448725504,
        "max_buffer_length": 77309411328,
        "resource_limit": 499000,
    },
    "m2_ultra": {
        "device_name": "Apple M2 Ultra",
        "architecture": "applegpu_g14d",
        "memory_size": 192 * GiB,
        "max_recommended_working_set_size": 193273528320,
        "max_buffer_length": 115964116992,
        "resource_limit": 499000,
    },
}

# mx.device_info() on CUDA; the H200 one carries memory_size instead of total_memory.
H100_DEVICE_INFO = {
    "device_name": "NVIDIA H100 80GB HBM3",
    "uuid": "GPU-4f6e2a1c-93b7-5d08-e1a2-7c3b9d0f1e55",
    "architecture": "sm_90",
    "pci_bus_id": "0000:18:00.0",
    "compute_capability_major": 9,
    "compute_capability_minor": 0,
    "free_memory": 84938555392,
    "total_memory": 85520809984,
}
H200_DEVICE_INFO = {
    "device_name": "NVIDIA H200",
    "uuid": "GPU-b2d94c17-0e6a-3f58-a4c1-95e7d3b20a8f",
    "architecture": "sm_90",
    "pci_bus_id": "0000:1b:00.0",
    "compute_capability_major": 9,
    "compute_capability_minor": 0,
    "memory_size": 150754820096,
}


def apple_chip(name, family, tier, arch, gpu_cores, memory, bandwidth, cpu_cores):
    return Chip(
        vendor="apple",
        name=name,
        family=family,
        tier=tier,
        backend="metal",
        arch=arch,
        gpu_cores=gpu_cores,
        memory_bytes=memory,
        memory_bandwidth_gbs=bandwidth,
        cpu_cores=cpu_cores,
    )


APPLE_CASES = [
    (
        "m1",
        apple_chip("Apple M1", "M1", "base", "applegpu_g13g", 7, 8 * GiB, 68.25, 8),
        "apple-m1-7c",
    ),
    (
        "m2_pro",
        apple_chip("Apple M2 Pro", "M2", "Pro", "applegpu_g14s", 19, 32 * GiB, 200.0, 12),
        "apple-m2-pro-19c",
    ),
    (
        "m3_max",
        apple_chip("Apple M3 Max", "M3", "Max", "applegpu_g15s", 30, 36 * GiB, 300.0, 14),
        "apple-m3-max-30c",
    ),
    (
        "m4_max",
        apple_chip("Apple M4 Max", "M4", "Max", "applegpu_g16s", 40, 128 * GiB, 546.0, 16),
        "apple-m4-max-40c",
    ),
    (
        "m2_ultra",
        apple_chip("Apple M2 Ultra", "M2", "Ultra", "applegpu_g14d", 76, 192 * GiB, 800.0, 24),
        "apple-m2-ultra-76c",
    ),
]


@pytest.mark.parametrize("machine, expected, slug", APPLE_CASES)
def test_apple_recorded(machine, expected, slug):
    ioreg = read(f"apple_{machine}_ioreg.txt")
    sysctl = sysctl_of(machine)
    chip = parse_apple(APPLE_DEVICE_INFO[machine], ioreg, sysctl, int(sysctl["hw.ncpu"]))
    assert chip == expected
    assert chip.slug == slug


@pytest.mark.parametrize(
    "machine, gpu_cores, bandwidth",
    [
        ("m2_pro", 19, 200.0),  # 8 P-cores: the 12-core CPU, which comes only with 19c
        ("m3_max", 30, 300.0),  # 10 P-cores: the binned M3 Max
        ("m4_max", 40, 546.0),  # 12 P-cores: the full M4 Max
        ("m1", 8, 68.25),  # the CPU does not tell 7c from 8c: the full chip is assumed
    ],
)
def test_apple_without_ioreg(machine, gpu_cores, bandwidth):
    chip = parse_apple(APPLE_DEVICE_INFO[machine], None, sysctl_of(machine), 8)
    assert (chip.gpu_cores, chip.memory_bandwidth_gbs) == (gpu_cores, bandwidth)


def test_apple_name_and_memory_from_sysctl():
    chip = parse_apple({}, read("apple_m4_max_ioreg.txt"), sysctl_of("m4_max"), 16)
    assert (chip.name, chip.family, chip.tier) == ("Apple M4 Max", "M4", "Max")
    assert chip.memory_bytes == 128 * GiB
    assert chip.slug == "apple-m4-max-40c"


@pytest.mark.parametrize(
    "name, expected",
    [
        ("Apple M1", ("M1", "base")),
        ("Apple M1 Pro", ("M1", "Pro")),
        ("Apple M3 Ultra", ("M3", "Ultra")),
        ("apple m4 max", ("M4", "Max")),
        ("Apple M5", ("M5", "base")),
        ("Apple A18 Pro", None),
        ("NVIDIA H100 80GB HBM3", None),
        ("", None),
    ],
)
def test_parse_chip_name(name, expected):
    assert parse_chip_name(name) == expected


def test_apple_table():
    for key, spec in APPLE_CHIPS.items():
        assert parse_chip_name(f"Apple {key}") is not None, key
        assert spec.gpu_core_options and all(b > 0 for b in spec.bandwidth_gbs.values()), key
        assert set(spec.gpu_cores_by_pcores.values()) <= set(spec.gpu_core_options), key
    assert APPLE_CHIPS["M4 Max"].bandwidth_for(32) == 410.0
    assert APPLE_CHIPS["M4 Max"].bandwidth_for(40) == 546.0
    # An unlisted bin gets a figure only where every bin has the same bandwidth.
    assert APPLE_CHIPS["M4 Max"].bandwidth_for(36) is None
    assert APPLE_CHIPS["M2"].bandwidth_for(9) == 100.0


def test_parse_ioreg_gpu_cores():
    assert parse_ioreg_gpu_cores(read("apple_m1_ioreg.txt")) == 7
    assert parse_ioreg_gpu_cores('"gpu-core-count" = 0') is None
    assert parse_ioreg_gpu_cores("ioreg: command not found") is None
    assert parse_ioreg_gpu_cores(None) is None


def test_nvidia_h100():
    chip = parse_nvidia(H100_DEVICE_INFO, 16)
    assert chip == Chip(
        vendor="nvidia",
        name="NVIDIA H100 80GB HBM3",
        family="hopper",
        tier="",
        backend="cuda",
        arch="sm_90",
        gpu_cores=132,
        memory_bytes=85520809984,
        memory_bandwidth_gbs=3350.0,
        cpu_cores=16,
    )
    assert chip.slug == "nvidia-h100-80gb-hbm3"


def test_nvidia_h200_memory_size_key():
    chip = parse_nvidia(H200_DEVICE_INFO, 16)
    assert (chip.family, chip.arch, chip.gpu_cores) == ("hopper", "sm_90", 132)
    assert (chip.memory_bytes, chip.memory_bandwidth_gbs) == (150754820096, 4800.0)
    assert chip.slug == "nvidia-h200"


@pytest.mark.parametrize(
    "major, minor, family",
    [
        (7, 0, "volta"),
        (7, 5, "turing"),
        (8, 0, "ampere"),
        (8, 6, "ampere"),
        (8, 7, "ampere"),
        (8, 9, "ada"),
        (9, 0, "hopper"),
        (10, 0, "blackwell"),
        (10, 3, "blackwell"),
        (12, 0, "blackwell"),
        (6, 1, ""),
    ],
)
def test_family_from_sm(major, minor, family):
    assert family_from_sm(major, minor) == family


def test_nvidia_arch_from_architecture_string():
    chip = parse_nvidia({"device_name": "NVIDIA GeForce RTX 5090", "architecture": "sm_120"}, 8)
    assert (chip.arch, chip.family, chip.gpu_cores) == ("sm_120", "blackwell", None)


@pytest.mark.parametrize(
    "name, facts",
    [
        ("NVIDIA A100-SXM4-80GB", (108, 2039.0)),
        ("NVIDIA A100 80GB PCIe", (108, 1935.0)),
        ("NVIDIA A100-SXM4-40GB", (108, 1555.0)),
        ("NVIDIA H100 PCIe", (114, 2000.0)),
        ("NVIDIA H100 NVL", (132, 3900.0)),
        ("NVIDIA L4", (58, 300.0)),
        ("NVIDIA L40S", (142, 864.0)),
        ("NVIDIA A10", (72, 600.0)),
        ("NVIDIA GH200 480GB", (None, None)),
        ("", (None, None)),
    ],
)
def test_gpu_facts(name, facts):
    assert gpu_facts(name) == facts


def test_cpu_amd_epyc():
    device_info = {"architecture": "x86_64", "device_name": "AMD EPYC"}
    cpuinfo, meminfo = read("cpuinfo_amd_epyc.txt"), read("meminfo_amd_epyc.txt")
    chip = parse_cpu(device_info, cpuinfo, meminfo, 2)
    assert chip == Chip(
        vendor="amd",
        name="AMD EPYC",
        family="x86_64",
        tier="",
        backend="cpu",
        arch="x86_64",
        gpu_cores=None,
        memory_bytes=24684084 * 1024,
        memory_bandwidth_gbs=None,
        cpu_cores=2,
        isa=(
            "avx",
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512_vnni",
            "avx512_bf16",
        ),
    )
    assert chip.slug == "cpu-amd-epyc-2c"


def test_cpu_arm64_features():
    # MLX names the CPU by its architecture where /proc/cpuinfo has no model name.
    device_info = {"architecture": "aarch64", "device_name": "aarch64"}
    cpuinfo = read("cpuinfo_arm64_neoverse_v1.txt")
    chip = parse_cpu(device_info, cpuinfo, read("meminfo_arm64_neoverse_v1.txt"), 4)
    assert (chip.vendor, chip.name, chip.arch, chip.family) == (
        "arm",
        "ARM Neoverse V1",
        "arm64",
        "arm64",
    )
    assert chip.isa == ("neon", "fp16", "dotprod", "i8mm", "bf16", "sve")
    assert chip.memory_bytes == 16078208 * 1024
    assert chip.slug == "cpu-arm-neoverse-v1-4c"


def test_cpu_model_name_when_device_name_is_vague():
    cpuinfo = (
        "vendor_id\t: GenuineIntel\n"
        "model name\t: Intel(R) Xeon(R) Platinum 8480+\n"
        "flags\t\t: fpu sse4_2 avx avx2 avx512f avx512_fp16 amx_tile amx_bf16\n"
    )
    chip = parse_cpu({"architecture": "x86_64", "device_name": "x86_64"}, cpuinfo, "", 8)
    assert (chip.vendor, chip.name) == ("intel", "Intel Xeon Platinum 8480+")
    assert chip.isa == ("avx", "avx2", "avx512f", "avx512_fp16", "amx_tile", "amx_bf16")
    assert chip.slug == "cpu-intel-xeon-platinum-8480-8c"


def test_cpu_macos_from_sysctl():
    device_info = {"architecture": "arm64", "device_name": "Apple M4 Max"}
    chip = parse_cpu(device_info, "", "", 16, sysctl_of("m4_max"))
    assert (chip.vendor, chip.name, chip.arch, chip.isa) == (
        "apple",
        "Apple M4 Max",
        "arm64",
        ("neon",),
    )
    assert chip.memory_bytes == 128 * GiB
    assert chip.slug == "cpu-apple-m4-max-16c"


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("Intel(R) Core(TM) i9-9900K CPU @ 3.60GHz", "Intel Core i9-9900K"),
        ("Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz", "Intel Xeon Gold 6338"),
        ("AMD EPYC 9654 96-Core Processor", "AMD EPYC 9654"),
        ("AMD Ryzen 9 7950X 16-Core Processor", "AMD Ryzen 9 7950X"),
        ("Apple M2", "Apple M2"),
        ("  AMD   EPYC  ", "AMD EPYC"),
    ],
)
def test_clean_cpu_name(raw, clean):
    assert clean_cpu_name(raw) == clean


def test_parse_meminfo_total():
    assert parse_meminfo_total(read("meminfo_amd_epyc.txt")) == 24684084 * 1024
    assert parse_meminfo_total("MemFree: 12 kB") is None


def recorded_chips():
    chips = [expected for _, expected, _ in APPLE_CASES]
    chips += [parse_nvidia(H100_DEVICE_INFO, 16), parse_nvidia(H200_DEVICE_INFO, 16)]
    cpuinfo, meminfo = read("cpuinfo_amd_epyc.txt"), read("meminfo_amd_epyc.txt")
    chips.append(parse_cpu({"architecture": "x86_64"}, cpuinfo, meminfo, 2))
    return chips


@pytest.mark.parametrize("chip", recorded_chips(), ids=lambda chip: chip.slug)
def test_to_dict_round_trip(chip):
    d = json.loads(json.dumps(chip.to_dict()))
    assert d["slug"] == chip.slug
    assert Chip.from_dict(d) == chip


chips = st.builds(
    Chip,
    vendor=st.sampled_from(["apple", "nvidia", "amd", "intel", "arm", "unknown"]) | st.text(),
    name=st.text(),
    family=st.text(),
    tier=st.sampled_from(["", "base", "Pro", "Max", "Ultra"]),
    backend=st.sampled_from(BACKENDS),
    arch=st.text(),
    gpu_cores=st.none() | st.integers(min_value=0, max_value=10**6),
    memory_bytes=st.none() | st.integers(min_value=0, max_value=1 << 50),
    memory_bandwidth_gbs=st.none() | st.floats(allow_nan=False, allow_infinity=False),
    cpu_cores=st.integers(min_value=1, max_value=4096),
    isa=st.lists(st.text()).map(tuple),
)


@given(chips)
def test_slug_charset(chip):
    assert SLUG.match(chip.slug)
    assert Chip.from_dict(json.loads(json.dumps(chip.to_dict()))) == chip


def test_slug_vendor_prefix():
    def gpu(vendor, name):
        return Chip(vendor, name, "", "", "cuda", "", None, None, None, 1)

    assert gpu("nvidia", "Tesla T4").slug == "nvidia-tesla-t4"
    assert gpu("nvidia", "NVIDIA H200").slug == "nvidia-h200"
    assert gpu("nvidia", "").slug == "nvidia"
    assert gpu("unknown", "").slug == "unknown"
    assert gpu("unknown", "!!!").slug == "unknown"


def test_chip_rejects_unknown_backend():
    with pytest.raises(ValueError, match=r"\[Chip\]"):
        Chip("apple", "Apple M4", "M4", "base", "vulkan", "", None, None, None, 1)


def test_garbage_never_raises():
    apple = parse_apple({}, None, {}, 1)
    assert (apple.name, apple.family, apple.tier, apple.slug) == ("", "", "", "apple")
    assert (apple.gpu_cores, apple.memory_bytes, apple.memory_bandwidth_gbs) == (None, None, None)

    bad_info = {"device_name": "Apple M9 Max", "memory_size": "lots", "architecture": None}
    bad_sysctl = {"hw.memsize": "-5", "hw.perflevel0.physicalcpu": "x"}
    apple = parse_apple(bad_info, '"gpu-core-count" = many', bad_sysctl, 1)
    assert (apple.family, apple.gpu_cores, apple.memory_bytes) == ("M9", None, None)
    assert apple.memory_bandwidth_gbs is None

    nvidia = parse_nvidia({"architecture": "sm_xx", "compute_capability_major": "9"}, 1)
    assert (nvidia.family, nvidia.arch, nvidia.gpu_cores, nvidia.memory_bytes) == (
        "",
        "",
        None,
        None,
    )
    assert nvidia.slug == "nvidia"

    cpu = parse_cpu({}, "garbage\n::::\nCPU implementer : zz\n", "MemTotal: lots", 1)
    assert (cpu.name, cpu.memory_bytes, cpu.isa, cpu.slug) == ("", None, (), "cpu-1c")


@given(st.text(), st.text(), st.text())
def test_random_command_output_never_raises(ioreg, proc_text, sysctl_text):
    sysctl = parse_sysctl(sysctl_text)
    assert SLUG.match(parse_apple(APPLE_DEVICE_INFO["m1"], ioreg, sysctl, 1).slug)
    assert SLUG.match(parse_cpu({}, proc_text, proc_text, 1, sysctl).slug)


def test_run_command_missing_binary():
    assert run_command(["mlxp-no-such-command-here"]) is None


@pytest.mark.skipif(sys.platform == "darwin", reason="ioreg and sysctl exist on macOS")
def test_detect_apple_without_macos_commands():
    chip = detect_apple(APPLE_DEVICE_INFO["m4_max"], 16)
    assert (chip.gpu_cores, chip.memory_bandwidth_gbs, chip.slug) == (40, 546.0, "apple-m4-max-40c")


def test_current_backend_on_cpu_default():
    previous = mx.default_device()
    mx.set_default_device(mx.cpu)
    try:
        assert current_backend() == "cpu"
    finally:
        mx.set_default_device(previous)


def test_detect_chip_here():
    chip = detect_chip("cpu")
    assert chip.backend == "cpu"
    assert chip.cpu_cores >= 1
    assert chip.arch in ("x86_64", "arm64")
    assert SLUG.match(chip.slug)
    assert detect_chip("cpu") is chip
    assert detect_chip().backend == current_backend()


def test_detect_chip_bad_backend():
    with pytest.raises(ValueError, match="detect_chip"):
        detect_chip("tpu")
    if not mx.cuda.is_available():
        with pytest.raises(ValueError, match="not available"):
            detect_chip("cuda")


def test_hardware_imports_nothing_else_from_the_package():
    for path in HARDWARE_SOURCES.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level in (0, 1), f"{path.name} imports from outside hardware/"
                assert not (node.module or "").startswith("mlx_primitives"), path.name
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("mlx_primitives") for a in node.names), path.name
