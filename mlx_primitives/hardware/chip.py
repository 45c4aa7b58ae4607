"""The Chip record: the processor that runs MLX ops on one back-end, and its stable slug."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import asdict, dataclass, fields
from typing import Any

BACKENDS = ("metal", "cuda", "cpu")


def slugify(text: str) -> str:
    """Lower-case ASCII words of ``text`` joined by single hyphens ("" when none are left)."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")


def to_int(value: Any) -> int | None:
    """A positive int from an int or a decimal string; None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    return value if isinstance(value, int) and value > 0 else None


def slug_backend(slug: str) -> str:
    """The back-end of the chip a slug names, read from the slug's form (:attr:`Chip.slug`):
    ``cpu-...`` runs on the CPU, an Apple GPU on Metal, any other GPU on CUDA."""
    if slug.startswith("cpu-"):
        return "cpu"
    return "metal" if slug.startswith("apple-") else "cuda"


def _vendor_and_name(vendor: str, name: str) -> str:
    # "Tesla T4" files under "nvidia-tesla-t4"; "Apple M4" must not become "apple-apple-m4".
    base, prefix = slugify(name), slugify(vendor)
    if prefix in ("", "unknown") or base == prefix or base.startswith(prefix + "-"):
        return base
    return f"{prefix}-{base}" if base else prefix


@dataclass(frozen=True)
class Chip:
    """The processor that runs MLX ops on one back-end.

    Args:
        vendor: "apple", "nvidia", "amd", "intel", "arm" or "unknown".
        name: Marketing name, e.g. "Apple M4 Max", "NVIDIA H100 80GB HBM3", "AMD EPYC".
        family: "M4" (Apple), "hopper" (NVIDIA, from the SM version), "x86_64" (CPU).
        tier: Apple only: "base", "Pro", "Max" or "Ultra"; "" elsewhere.
        backend: The MLX back-end that runs ops on this chip: "metal", "cuda" or "cpu".
        arch: "applegpu_g16s", "sm_90", "x86_64", "arm64".
        gpu_cores: Apple GPU cores or NVIDIA SMs; None when unknown.
        memory_bytes: Unified memory (Apple), GPU memory (NVIDIA) or RAM (CPU).
        memory_bandwidth_gbs: Published peak memory bandwidth in GB/s; None when unknown.
        cpu_cores: CPU cores this process may run on.
        isa: CPU only: notable instruction-set extensions, e.g. ("avx2", "avx512f").
    """

    vendor: str
    name: str
    family: str
    tier: str
    backend: str
    arch: str
    gpu_cores: int | None
    memory_bytes: int | None
    memory_bandwidth_gbs: float | None
    cpu_cores: int
    isa: tuple[str, ...] = ()

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"[Chip] backend must be one of {BACKENDS}, got {self.backend!r}.")

    @property
    def slug(self) -> str:
        """Stable file-name key: lower-case words of [a-z0-9] joined by single hyphens.

        GPU chips: vendor and name, plus "-<N>c" for the Apple GPU core count (the bins of one
        chip differ in speed), e.g. "nvidia-h100-80gb-hbm3", "apple-m4-max-40c". CPU chips:
        "cpu-", vendor and name, then "-<N>c" for the CPU cores, e.g. "cpu-amd-epyc-2c".
        """
        words = _vendor_and_name(self.vendor, self.name)
        if self.backend == "cpu":
            text = f"cpu-{words}-{self.cpu_cores}c"
        elif self.backend == "metal" and self.gpu_cores:
            text = f"{words}-{self.gpu_cores}c"
        else:
            text = words
        return slugify(text) or "unknown"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict of the fields, with the slug added for readers of stored records."""
        d = asdict(self)
        d["isa"] = list(self.isa)
        d["slug"] = self.slug
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Chip:
        """The inverse of ``to_dict``; keys that are not fields (such as "slug") are ignored."""
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs["isa"] = tuple(kwargs.get("isa", ()))
        return cls(**kwargs)
