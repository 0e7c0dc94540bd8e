"""What this machine is: the CPU's model, its speed-relevant instruction-set flags, its physical cores.

Standard library only; read by the kernel choice (`speed/kernel_choice.py`), `paligemma env` and every
benchmark's record of where it ran.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

# The flags that decide which kernels are fast: AVX2 and FMA (every x86 CPU of the last decade), AVX-512,
# its bf16 and VNNI (int8 dot product) extensions, AVX-VNNI, and AMX's tile units.
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16",
               "amx_int8")


@functools.cache
def _cpuinfo() -> dict[str, str]:
    info = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())  # the first CPU's
    except OSError:
        pass
    return info


def cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_flags(wanted=SPEED_FLAGS) -> list[str]:
    """Those of `wanted` that the CPU reports, sorted (empty where /proc/cpuinfo is not there)."""
    have = set(_cpuinfo().get("flags", "").split())
    return sorted(f for f in wanted if f in have)


def physical_cores() -> int:
    """Distinct (package, core) pairs among the CPUs this process may run on."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add((topo.joinpath("physical_package_id").read_text().strip(),
                       topo.joinpath("core_id").read_text().strip()))
        except OSError:
            cores.add(("?", str(cpu)))
    return max(1, len(cores))
