"""NVIDIA GPUs: parse what MLX's CUDA back-end reports into a Chip."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .chip import Chip, slugify, to_int

# (words that must all be in the name, SM count, memory bandwidth in GB/s), from NVIDIA's
# datasheets. The first match wins, so the PCIe and NVL forms come before the plain name.
_GPUS: tuple[tuple[tuple[str, ...], int, float], ...] = (
    (("h100", "pcie"), 114, 2000.0),
    (("h100", "nvl"), 132, 3900.0),
    (("h100",), 132, 3350.0),  # SXM5, "H100 80GB HBM3"
    (("h200",), 132, 4800.0),  # SXM and NVL
    (("b200",), 148, 8000.0),
    (("a100", "80gb", "pcie"), 108, 1935.0),
    (("a100", "80gb"), 108, 2039.0),  # SXM4
    (("a100",), 108, 1555.0),  # 40GB, SXM4 and PCIe
    (("l40s",), 142, 864.0),
    (("l4",), 58, 300.0),
    (("a10",), 72, 600.0),
    (("rtx", "4090"), 128, 1008.0),
    (("t4",), 40, 320.0),
)

_SM = re.compile(r"^sm_(\d+)(\d)[a-z]?$")


def family_from_sm(major: int, minor: int) -> str:
    """The architecture family of compute capability ``major.minor`` ("" if unknown)."""
    if major == 7:
        return "turing" if minor >= 5 else "volta"
    if major == 8:
        return "ada" if minor == 9 else "ampere"
    if major == 9:
        return "hopper"
    # sm_100/103 (B200, B300), sm_110 (Thor) and sm_120/121 (RTX 50, DGX Spark).
    return "blackwell" if major in (10, 11, 12) else ""


def gpu_facts(name: str) -> tuple[int | None, float | None]:
    """(SM count, memory bandwidth in GB/s) of a known GPU name, else (None, None)."""
    words = set(slugify(name).split("-"))
    for required, sms, bandwidth in _GPUS:
        if words.issuperset(required):
            return sms, bandwidth
    return None, None


def _compute_capability(device_info: Mapping[str, Any]) -> tuple[int, int] | None:
    major = device_info.get("compute_capability_major")
    minor = device_info.get("compute_capability_minor")
    # Minor 0 is falsy for to_int, so test ints directly.
    if isinstance(major, int) and isinstance(minor, int) and major > 0 and minor >= 0:
        return major, minor
    match = _SM.match(str(device_info.get("architecture") or ""))
    return (int(match.group(1)), int(match.group(2))) if match else None


def parse_nvidia(device_info: Mapping[str, Any], cores: int) -> Chip:
    """The NVIDIA GPU behind the CUDA back-end.

    Args:
        device_info: ``mx.device_info()`` on CUDA (device_name, architecture,
            compute_capability_major/minor, total_memory or memory_size).
        cores: CPU cores this process may run on.
    """
    name = str(device_info.get("device_name") or "").strip()
    capability = _compute_capability(device_info)
    sms, bandwidth = gpu_facts(name)
    memory = to_int(device_info.get("total_memory")) or to_int(device_info.get("memory_size"))
    return Chip(
        vendor="nvidia",
        name=name,
        family=family_from_sm(*capability) if capability else "",
        tier="",
        backend="cuda",
        arch=f"sm_{capability[0]}{capability[1]}" if capability else "",
        gpu_cores=sms,
        memory_bytes=memory,
        memory_bandwidth_gbs=bandwidth,
        cpu_cores=cores,
    )
