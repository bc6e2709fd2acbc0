"""What a benchmark ran on, for the JSON and markdown it saves."""

from __future__ import annotations

import platform
from pathlib import Path

from cifarlab.cpu import cpu_flags as read_flags


def cpu_model() -> str:
    """The processor's model name, from /proc/cpuinfo where there is one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# Instruction-set flags that decide how fast a CPU trains (AVX2 vs AVX-512, bf16, AMX) and how
# it runs int8 (the VNNI and AMX int8 dot products).
_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_bf16",
    "avx512_vnni",
    "avx_vnni",
    "amx_bf16",
    "amx_tile",
    "amx_int8",
)


def cpu_flags() -> list[str]:
    """The instruction-set flags of this CPU that matter to training and int8 (`_FLAGS`)."""
    have = read_flags() or set()
    return [f for f in _FLAGS if f in have]
