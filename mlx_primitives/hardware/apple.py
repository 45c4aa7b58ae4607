"""Apple Silicon: published chip facts, and parsing what Metal, ioreg and sysctl report."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .chip import Chip, to_int

SYSCTL_KEYS = (
    "machdep.cpu.brand_string",
    "hw.memsize",
    "hw.ncpu",
    "hw.perflevel0.physicalcpu",
    "hw.perflevel1.physicalcpu",
)


@dataclass(frozen=True)
class AppleChipSpec:
    """Published facts for one Apple chip.

    Args:
        bandwidth_gbs: GPU-core bin -> unified memory bandwidth in GB/s. The largest bin is the
            full chip; binned parts have fewer GPU cores and, on some chips, less bandwidth.
        gpu_cores_by_pcores: Performance-core count -> GPU bin, for chips where the CPU bin
            decides the GPU bin (used when ioreg cannot be read).
    """

    bandwidth_gbs: dict[int, float]
    gpu_cores_by_pcores: dict[int, int] = field(default_factory=dict)

    @property
    def gpu_core_options(self) -> tuple[int, ...]:
        return tuple(sorted(self.bandwidth_gbs))

    def bandwidth_for(self, gpu_cores: int | None) -> float | None:
        """Bandwidth of the bin with ``gpu_cores`` cores; for an unlisted bin, only if all agree."""
        if gpu_cores in self.bandwidth_gbs:
            return self.bandwidth_gbs[gpu_cores]
        values = set(self.bandwidth_gbs.values())
        return values.pop() if len(values) == 1 else None


# Sources: Apple Newsroom launch releases and the products' tech-specs pages (dates below).
APPLE_CHIPS: dict[str, AppleChipSpec] = {
    # 2020-11-10. 7c: binned (MacBook Air, iMac). Apple gives no M1 figure: 68.25 is its
    # LPDDR4X-4266 x 128-bit bus, matching the M2 release's "50 percent more than M1".
    "M1": AppleChipSpec({7: 68.25, 8: 68.25}),
    # 2021-10-18. 14c: binned; the 8-core CPU (6P) comes only with 14c.
    "M1 Pro": AppleChipSpec({14: 200.0, 16: 200.0}, {6: 14}),
    "M1 Max": AppleChipSpec({24: 400.0, 32: 400.0}),  # 24c: binned
    "M1 Ultra": AppleChipSpec({48: 800.0, 64: 800.0}),  # 2022-03-08. 48c: binned
    "M2": AppleChipSpec({8: 100.0, 10: 100.0}),  # 2022-06-06. 8c: binned
    # 2023-01-17. 16c: binned, with the 10-core CPU (6P); 19c with the 12-core CPU (8P).
    "M2 Pro": AppleChipSpec({16: 200.0, 19: 200.0}, {6: 16, 8: 19}),
    "M2 Max": AppleChipSpec({30: 400.0, 38: 400.0}),  # 30c: binned
    "M2 Ultra": AppleChipSpec({60: 800.0, 76: 800.0}),  # 2023-06-05. 60c: binned
    "M3": AppleChipSpec({8: 100.0, 10: 100.0}),  # 2023-10-30. 8c: binned
    # 14c: binned, with the 11-core CPU (5P); 18c with the 12-core CPU (6P).
    "M3 Pro": AppleChipSpec({14: 150.0, 18: 150.0}, {5: 14, 6: 18}),
    # 30c: binned, 300 GB/s with the 14-core CPU (10P); 40c: 400 GB/s with 16 cores (12P).
    "M3 Max": AppleChipSpec({30: 300.0, 40: 400.0}, {10: 30, 12: 40}),
    # 2025-03-05 (Mac Studio). 60c: binned, 28-core CPU (20P); 80c: 32-core CPU (24P).
    "M3 Ultra": AppleChipSpec({60: 819.0, 80: 819.0}, {20: 60, 24: 80}),
    "M4": AppleChipSpec({8: 120.0, 10: 120.0}),  # 2024-05-07. 8c: binned (MacBook Air, iMac)
    # 2024-10-30. 16c: binned, 12-core CPU (8P); 20c: 14-core CPU (10P).
    "M4 Pro": AppleChipSpec({16: 273.0, 20: 273.0}, {8: 16, 10: 20}),
    # 32c: binned, 410 GB/s with the 14-core CPU (10P); 40c: 546 GB/s with 16 cores (12P).
    "M4 Max": AppleChipSpec({32: 410.0, 40: 546.0}, {10: 32, 12: 40}),
    "M5": AppleChipSpec({10: 153.0}),  # 2025-10-15
    "M5 Pro": AppleChipSpec({20: 307.0}),  # 2026-03-03: "up to 20-core GPU", "up to 307GB/s"
    # 2026-03-03: 40c, 614 GB/s. 32c: binned; Apple says only "up to 614GB/s", and 460 GB/s
    # comes from third-party spec listings.
    "M5 Max": AppleChipSpec({32: 460.0, 40: 614.0}),
}

_CHIP_NAME = re.compile(r"\bM(\d{1,2})(?:\s+(Pro|Max|Ultra))?\b", re.IGNORECASE)
_GPU_CORE_COUNT = re.compile(r'"gpu-core-count"\s*=\s*(\d+)')


def parse_chip_name(name: str) -> tuple[str, str] | None:
    """("M4", "Max") from "Apple M4 Max", ("M2", "base") from "Apple M2"; None if no M chip."""
    match = _CHIP_NAME.search(name)
    if match is None:
        return None
    tier = match.group(2).capitalize() if match.group(2) else "base"
    return f"M{match.group(1)}", tier


def parse_ioreg_gpu_cores(text: str | None) -> int | None:
    """The "gpu-core-count" of ``ioreg -rc AGXAccelerator -d1`` output."""
    match = _GPU_CORE_COUNT.search(text or "")
    return to_int(match.group(1)) if match else None


def parse_sysctl(text: str) -> dict[str, str]:
    """``sysctl NAME...`` output ("name: value" lines) as a dict."""
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in pairs}


def parse_apple(
    device_info: Mapping[str, Any], ioreg_text: str | None, sysctl: Mapping[str, str], cores: int
) -> Chip:
    """The Apple chip behind the Metal back-end.

    Args:
        device_info: ``mx.device_info()`` on Metal (device_name, architecture, memory_size).
        ioreg_text: ``ioreg -rc AGXAccelerator -d1`` output, or None where it could not run.
        sysctl: ``parse_sysctl`` of the SYSCTL_KEYS.
        cores: CPU cores this process may run on.
    """
    name = str(device_info.get("device_name") or sysctl.get("machdep.cpu.brand_string") or "")
    name = name.strip()
    family, tier = parse_chip_name(name) or ("", "")
    spec = APPLE_CHIPS.get(family if tier == "base" else f"{family} {tier}")
    gpu_cores = parse_ioreg_gpu_cores(ioreg_text)
    if gpu_cores is None and spec is not None:
        # Without ioreg, the CPU bin decides the GPU bin where it can; else assume the full chip.
        pcores = to_int(sysctl.get("hw.perflevel0.physicalcpu"))
        gpu_cores = spec.gpu_cores_by_pcores.get(pcores, spec.gpu_core_options[-1])
    return Chip(
        vendor="apple",
        name=name,
        family=family,
        tier=tier,
        backend="metal",
        arch=str(device_info.get("architecture") or ""),
        gpu_cores=gpu_cores,
        memory_bytes=to_int(device_info.get("memory_size")) or to_int(sysctl.get("hw.memsize")),
        memory_bandwidth_gbs=spec.bandwidth_for(gpu_cores) if spec else None,
        cpu_cores=cores,
    )


def run_command(args: list[str], timeout: float = 5.0) -> str | None:
    """The command's standard output, or None where it is missing, fails to start or hangs."""
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    # sysctl exits non-zero when one name is unknown but still prints the others.
    return result.stdout or None


def read_sysctl() -> dict[str, str]:
    """The SYSCTL_KEYS this machine knows (empty off macOS)."""
    return parse_sysctl(run_command(["sysctl", *SYSCTL_KEYS]) or "")


def detect_apple(device_info: Mapping[str, Any], cores: int) -> Chip:
    """``parse_apple`` fed by this machine's ioreg and sysctl."""
    ioreg_text = run_command(["ioreg", "-rc", "AGXAccelerator", "-d1"])
    return parse_apple(device_info, ioreg_text, read_sysctl(), cores)
