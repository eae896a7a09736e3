"""Which precision the model computes in: `train.bf16` = true | false | "auto" (the default).

`auto` is bf16 where the hardware runs it natively and fp32 elsewhere:
- a CUDA GPU that supports bf16 (Ampere and later): bf16;
- a CPU with AVX512-BF16 or AMX-BF16 (`avx512_bf16` / `amx_bf16` in /proc/cpuinfo): bf16;
- any other CPU: fp32 (there bf16 is emulated, slower than fp32).
`true` / `false` force it. bf16 is DeepSpeed's bf16 mode in pretraining (bf16 weights, fp32 master
weights and moments) and bf16 autocast around the frozen encoder in the probes' feature passes.

`resolve_bf16(setting, hardware)` is the rule: pure, the hardware facts passed in (tests stub
them). `local_hardware(use_gpu)` reads the facts of the machine that calls it, so it must be
called where the model runs: the pretraining driver asks a Ray task scheduled like a training
worker (a GPU worker's hardware, not the driver's); the probes call it inside the actor or task
that holds the encoder.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch

CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of native CPU bf16 matmuls
AUTO = "auto"


@dataclass(frozen=True)
class Hardware:
    """What decides `auto`: the device the model runs on and its bf16 support."""

    device: str = "cpu"  # "cpu" or "cuda"
    cuda_bf16: bool = False  # torch.cuda.is_bf16_supported() on that GPU
    gpu_name: str = ""
    cpu_flags: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True)
class Precision:
    """The resolved precision and why (`bf16 (auto: avx512_bf16)`)."""

    bf16: bool
    reason: str

    @property
    def name(self) -> str:
        return "bf16" if self.bf16 else "fp32"

    def describe(self) -> str:
        return f"{self.name} ({self.reason})"


def resolve_bf16(setting: bool | str, hardware: Hardware) -> Precision:
    """`train.bf16` (true, false or "auto") on `hardware` -> the precision and the reason."""
    if setting is True or setting is False:
        return Precision(setting, f"train.bf16={str(setting).lower()}")
    if setting != AUTO:
        raise ValueError(f"train.bf16={setting!r} must be true, false or auto")
    if hardware.device == "cuda":
        gpu = hardware.gpu_name or "GPU"
        return Precision(True, f"auto: {gpu} bf16") if hardware.cuda_bf16 \
            else Precision(False, f"auto: {gpu} without bf16")
    native = [f for f in CPU_BF16_FLAGS if f in hardware.cpu_flags]
    if native:
        return Precision(True, f"auto: {native[0]}")
    return Precision(False, "auto: CPU without avx512_bf16/amx_bf16")


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo's `flags` line (empty where there is none,
    e.g. not Linux: `auto` then chooses fp32 on CPU)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


@functools.cache
def local_hardware(use_gpu: bool) -> Hardware:
    """The facts of this machine: its GPU when `use_gpu` (and CUDA is there), else its CPU."""
    if use_gpu and torch.cuda.is_available():
        return Hardware("cuda", cuda_bf16=torch.cuda.is_bf16_supported(including_emulation=False),
                        gpu_name=torch.cuda.get_device_name())
    return Hardware("cpu", cpu_flags=cpu_flags())


def local_precision(setting: bool | str, use_gpu: bool) -> Precision:
    """`resolve_bf16` on this machine's hardware."""
    return resolve_bf16(setting, local_hardware(use_gpu))
