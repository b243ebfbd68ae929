"""Numeric precision per device: which dtype to compute in, a matching autocast context, and a device description.

bf16 halves the work of the 3D convolutions that dominate CCELLA++ (BENCHMARKS.md), but only where the
hardware has native bf16: CUDA GPUs from Ampere on, and CPUs with AVX512_BF16 or AMX (e.g. AMD Zen 4, Intel Sapphire
Rapids). On AVX2-only CPUs PyTorch emulates bf16 and autocast runs 60-400x slower than fp32, so those get fp32.
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Iterable
from typing import ContextManager

import torch

__all__ = ["cpu_flags", "cpu_model_name", "cpu_has_native_bf16", "choose_dtype", "training_dtype", "unet_memory_format",
           "autocast_context", "describe_device"]

#: /proc/cpuinfo flags that mean native bf16 arithmetic (AVX-512 BF16 dot products, AMX tiles).
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def _read_cpuinfo(path: str = "/proc/cpuinfo") -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:  # not Linux, or no procfs in a container
        return ""


def cpu_flags(cpuinfo_path: str = "/proc/cpuinfo") -> frozenset[str]:
    """CPU feature flags of the first processor in ``/proc/cpuinfo`` (empty where it cannot be read)."""
    for line in _read_cpuinfo(cpuinfo_path).splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_model_name(cpuinfo_path: str = "/proc/cpuinfo") -> str:
    """The CPU's model name ("AMD EPYC 9454 48-Core Processor"), from /proc/cpuinfo or ``platform``."""
    for line in _read_cpuinfo(cpuinfo_path).splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "cpu model") and value.strip():
            return value.strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_has_native_bf16(capability: str | None = None, flags: Iterable[str] | None = None) -> bool:
    """Whether this CPU computes bf16 natively (else autocast to bf16 is emulated, 60-400x slower than fp32).

    Args:
        capability: what ``torch.backends.cpu.get_cpu_capability()`` reports ("DEFAULT", "NO AVX", "AVX2", "AVX512",
            "SVE256", ...); read from torch when None. torch 2.13 reports "AVX512" for every AVX-512 CPU, with or
            without bf16, so the flags decide in that case.
        flags: /proc/cpuinfo flags; read from the machine when None and ``capability`` is None too (a caller that
            names a capability describes a hypothetical CPU, so the real machine's flags must not leak in).
    """
    if flags is None:
        flags = cpu_flags() if capability is None else frozenset()
    if capability is None:
        capability = torch.backends.cpu.get_cpu_capability()
    cap = capability.upper()
    if "AMX" in cap or "BF16" in cap:  # future torch versions may report these directly
        return True
    # PyTorch's own bf16 kernels are dispatched through the AVX512 path; AVX2 dispatch means emulation.
    return cap.startswith("AVX512") and bool(BF16_CPU_FLAGS & {f.lower() for f in flags})


def choose_dtype(
    device: torch.device | str,
    *,
    cpu_capability: str | None = None,
    cpu_flags: Iterable[str] | None = None,
) -> torch.dtype:
    """The compute dtype for ``device``: ``torch.bfloat16`` where the hardware has native bf16, else ``torch.float32``.

    CUDA: bf16 if ``torch.cuda.is_bf16_supported()`` (Ampere and later). CPU: bf16 only with AVX512_BF16 or AMX (see
    :func:`cpu_has_native_bf16`; AVX2-only CPUs run bf16 60-400x slower than fp32). Anything else (MPS, ...): fp32.

    Example:
        >>> choose_dtype("cpu", cpu_capability="AVX2")
        torch.float32
    """
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16(cpu_capability, cpu_flags) else torch.float32
    return torch.float32


def training_dtype(device: torch.device | str) -> torch.dtype:
    """Training precision: bf16 autocast on GPUs that have it, fp32 on CPUs. CPU bf16 autocast gave NaN weight
    gradients in MONAI's 3D U-Net at small latent sizes (torch 2.13, AVX-512 BF16 CPU); CPU training serves tests
    and small models, where fp32 costs little and keeps runs reproducible."""
    device = torch.device(device)
    return choose_dtype(device) if device.type == "cuda" else torch.float32


def unet_memory_format(device: torch.device | str, dtype: torch.dtype) -> torch.memory_format:
    """Memory format of the diffusion U-Net's weights and latents at inference: ``torch.channels_last_3d`` for bf16
    on a CPU (oneDNN's bf16 3D convolutions run channels-last natively), else ``torch.contiguous_format``.

    Measured side by side (BENCHMARKS.md, "U-Net step"): paper-size step 1.47x faster than contiguous bf16 on an AMX
    CPU (4.23 -> 2.88 s), 1.06x on an AVX-512 BF16 CPU; in fp32 it gained only 8-13% (``bench_unet.py``), so fp32
    and the decoders keep the default layout.

    Example:
        >>> unet_memory_format("cpu", torch.float32)
        torch.contiguous_format
    """
    device = torch.device(device)
    if device.type == "cpu" and dtype == torch.bfloat16:
        return torch.channels_last_3d
    return torch.contiguous_format


def autocast_context(device: torch.device | str, dtype: torch.dtype) -> ContextManager:
    """``torch.autocast`` to ``dtype`` on ``device``, or a no-op context for fp32 (no autocast at all)."""
    device = torch.device(device)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def describe_device(device: torch.device | str) -> str:
    """One line naming the hardware behind ``device``, for logs and benchmark tables.

    Example: ``"CPU: AMD EPYC 9454 48-Core Processor (torch capability AVX512, native bf16: yes, 2 threads)"`` or
    ``"CUDA:0: NVIDIA H100 80GB HBM3 (79.1 GiB, compute capability 9.0)"``.
    """
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        gib = props.total_memory / 2**30
        return f"CUDA:{index}: {props.name} ({gib:.1f} GiB, compute capability {props.major}.{props.minor})"
    if device.type == "cpu":
        capability = torch.backends.cpu.get_cpu_capability()
        bf16 = "yes" if cpu_has_native_bf16() else "no"
        cores = os.cpu_count() or 0
        return (
            f"CPU: {cpu_model_name()} (torch capability {capability}, native bf16: {bf16}, "
            f"{torch.get_num_threads()} threads of {cores} cores)"
        )
    return f"{device.type.upper()}: {device}"
