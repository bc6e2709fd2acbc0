"""What this CPU can do, where it matters to more than speed (no heavy imports: the service
reads it too)."""

from __future__ import annotations

import os
from pathlib import Path

# CPU flags (/proc/cpuinfo) of int8 dot-product instructions: x86 VNNI and AMX, Arm's dot
# product. Without them onnxruntime's uint8 x int8 kernels sum pairs of products in 16 bits,
# which can saturate: the same int8 file can score differently on CPUs with and without them.
INT8_DOT_PRODUCT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8", "asimddp"})


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """The CPU's instruction-set flags (x86 `flags`, Arm `Features`); None where it does not
    say (no /proc/cpuinfo, or no such line in it)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        if line.lower().startswith(("flags", "features")):
            flags |= set(line.split(":", 1)[-1].split())
    return flags or None


def has_int8_dot_product(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool | None:
    """Whether this CPU has int8 dot-product instructions; None where it cannot tell."""
    flags = cpu_flags(cpuinfo)
    return None if flags is None else bool(flags & INT8_DOT_PRODUCT_FLAGS)


def usable_cores() -> int:
    """The cores this process may run on (its affinity, where the OS tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1
