"""The machine a process runs on, as the speed choices need it: whether bf16 matmuls are native,
the cores free to this process, and a name for a bench's header. Here, below algos/ (whose
runtime uses them too), so that the rollout workers can choose their engine's dtype with them."""
from __future__ import annotations

import math
import os
import platform

import torch


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 matmuls in hardware: a CUDA GPU that supports bf16, or a CPU
    with AVX512-BF16 or AMX. Elsewhere (an AVX2-only CPU) oneDNN emulates them: an SFT step of the
    TextWorld policy ran at 471 tokens/s under amp_bf16 against 5,319 in fp32 (AMD EPYC, AVX2)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # an older torch: read the flags the kernel reports
        return bool({"avx512_bf16", "amx_bf16"} & set(cpu_model()[1]))


# the CPU flags that move this project's numbers, strongest first: AMX tiles and AVX512-BF16 make
# bf16 matmuls native (docs/rollout.md has one table per kind), AVX2-only CPUs emulate bf16
MATRIX_FLAGS = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")


def cpu_model() -> tuple[str, list[str]]:
    """(the CPU's model name, which of MATRIX_FLAGS it reports), from /proc/cpuinfo."""
    fields: dict[str, str] = {}
    try:
        for line in open("/proc/cpuinfo"):  # the first processor's block is enough
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
            if not line.strip():
                break
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or "unknown CPU"
    return name, [f for f in MATRIX_FLAGS if f in fields.get("flags", "").split()]


def machine_name() -> str:
    """What a speed figure was measured on, for a bench's header: the CPU model, its matrix
    extensions, the cores free to this process, and the CUDA GPUs when torch sees any. E.g.
    'Intel(R) Xeon(R) Processor (amx_bf16, avx512_bf16, avx512f, avx2), 2 cores'."""
    name, flags = cpu_model()
    text = f"{name} ({', '.join(flags) or 'no AVX2'}), {free_cores()} cores"
    if torch.cuda.is_available():
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        text += "; GPU " + ", ".join(f"{n} x{gpus.count(n)}" for n in dict.fromkeys(gpus))
    return text


def free_cores() -> int:
    """The cores this process may run on: its CPU affinity (taskset, a Slurm or Ray allotment),
    capped by a cgroup v2 CPU quota (a container's --cpus). torch's own default counts the host's
    cores, and threads beyond the allotted cores spin against each other."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)
