"""CPUs: parse MLX's CPU device info, /proc/cpuinfo and /proc/meminfo (or sysctl) into a Chip."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from typing import Any

from .apple import read_sysctl
from .chip import Chip, to_int

# x86 flags worth knowing when choosing kernels, in the order they are reported.
_X86_ISA = (
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)
# Linux arm64 "Features" words -> the names people use for them.
_ARM_ISA = (
    ("asimd", "neon"),
    ("asimdhp", "fp16"),
    ("asimddp", "dotprod"),
    ("i8mm", "i8mm"),
    ("bf16", "bf16"),
    ("sve", "sve"),
    ("sve2", "sve2"),
    ("sme", "sme"),
)
# Linux arm64 reports no model name, only these ids.
_ARM_IMPLEMENTERS = {
    0x41: "ARM",
    0x48: "HiSilicon",
    0x51: "Qualcomm",
    0x61: "Apple",
    0xC0: "Ampere",
}
_ARM_PARTS = {
    0xD08: "Cortex-A72",
    0xD0B: "Cortex-A76",
    0xD0C: "Neoverse N1",
    0xD40: "Neoverse V1",
    0xD49: "Neoverse N2",
    0xD4F: "Neoverse V2",
}
_ARCH_ALIASES = {"aarch64": "arm64", "amd64": "x86_64"}
_VAGUE_NAMES = {"", "x86", "x86_64", "amd64", "arm", "arm64", "aarch64", "unknown"}
_NAME_NOISE = (
    re.compile(r"\((r|tm)\)|[®™]", re.IGNORECASE),
    re.compile(r"\s+(cpu\s+)?@.*$", re.IGNORECASE),  # "CPU @ 3.60GHz"
    re.compile(r"\s+\d+-core processor$|\s+processor$|\s+cpu$", re.IGNORECASE),
)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def parse_cpuinfo(text: str) -> dict[str, str]:
    """The first value of each "key : value" line of /proc/cpuinfo."""
    info: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info.setdefault(key.strip().lower(), value.strip())
    return info


def parse_meminfo_total(text: str) -> int | None:
    """MemTotal of /proc/meminfo in bytes."""
    match = re.search(r"^MemTotal:\s+(\d+)\s*kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def clean_cpu_name(name: str) -> str:
    """The name without trademarks, clock or core count: "Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz"
    -> "Intel Xeon Gold 6338", "AMD EPYC 9654 96-Core Processor" -> "AMD EPYC 9654"."""
    for pattern in _NAME_NOISE:
        name = pattern.sub("", name)
    return " ".join(name.split())


def _arm_name(cpuinfo: Mapping[str, str]) -> str:
    try:
        implementer = int(cpuinfo.get("cpu implementer", ""), 16)
        part = int(cpuinfo.get("cpu part", ""), 16)
    except ValueError:
        return ""
    vendor = _ARM_IMPLEMENTERS.get(implementer, "")
    model = _ARM_PARTS.get(part, "") if implementer == 0x41 else ""
    return f"{vendor} {model}".strip()


def _vendor(name: str, cpuinfo: Mapping[str, str], arch: str) -> str:
    words = set(name.lower().split())
    vendor_id = cpuinfo.get("vendor_id", "")
    if "apple" in words or cpuinfo.get("cpu implementer", "").lower() == "0x61":
        return "apple"
    if words & {"amd", "epyc", "ryzen"} or vendor_id == "AuthenticAMD":
        return "amd"
    if words & {"intel", "xeon"} or vendor_id == "GenuineIntel":
        return "intel"
    return "arm" if arch == "arm64" else "unknown"


def _isa(cpuinfo: Mapping[str, str], arch: str) -> tuple[str, ...]:
    if "flags" in cpuinfo:
        flags = set(cpuinfo["flags"].split())
        return tuple(flag for flag in _X86_ISA if flag in flags)
    if "features" in cpuinfo:
        features = set(cpuinfo["features"].split())
        return tuple(name for word, name in _ARM_ISA if word in features)
    # Advanced SIMD is mandatory on arm64, so it is known even where no feature list is read.
    return ("neon",) if arch == "arm64" else ()


def parse_cpu(
    device_info: Mapping[str, Any],
    cpuinfo_text: str,
    meminfo_text: str,
    cores: int,
    sysctl: Mapping[str, str] | None = None,
) -> Chip:
    """The CPU behind MLX's CPU back-end.

    Args:
        device_info: ``mx.device_info(mx.cpu)`` (device_name, architecture).
        cpuinfo_text: /proc/cpuinfo ("" off Linux).
        meminfo_text: /proc/meminfo ("" off Linux).
        cores: CPU cores this process may run on.
        sysctl: macOS ``parse_sysctl`` output, for the brand string and hw.memsize.
    """
    sysctl = sysctl or {}
    cpuinfo = parse_cpuinfo(cpuinfo_text)
    raw_arch = str(device_info.get("architecture") or "").strip().lower()
    arch = _ARCH_ALIASES.get(raw_arch, raw_arch)
    if not arch:
        arch = "x86_64" if "flags" in cpuinfo else "arm64" if "features" in cpuinfo else ""
    # MLX falls back to the architecture as the name where /proc/cpuinfo has no model name.
    candidates = (
        str(device_info.get("device_name") or ""),
        cpuinfo.get("model name", ""),
        _arm_name(cpuinfo),
        sysctl.get("machdep.cpu.brand_string", ""),
    )
    names = (clean_cpu_name(c) for c in candidates)
    name = next((n for n in names if n.lower() not in _VAGUE_NAMES), arch)
    memory = parse_meminfo_total(meminfo_text) or to_int(sysctl.get("hw.memsize"))
    return Chip(
        vendor=_vendor(name, cpuinfo, arch),
        name=name,
        family=arch,
        tier="",
        backend="cpu",
        arch=arch,
        gpu_cores=None,
        memory_bytes=memory,
        memory_bandwidth_gbs=None,
        cpu_cores=cores,
        isa=_isa(cpuinfo, arch),
    )


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def detect_cpu(device_info: Mapping[str, Any], cores: int) -> Chip:
    """``parse_cpu`` fed by this machine's /proc files, or by sysctl on macOS."""
    if sys.platform == "darwin":
        return parse_cpu(device_info, "", "", cores, read_sysctl())
    return parse_cpu(device_info, _read_text("/proc/cpuinfo"), _read_text("/proc/meminfo"), cores)
