"""The device and the precision a study runs in, decided once for this machine (before any key).

Light on purpose: the input checks of every `ftstudy run` read it before anything is imported for training
(torch only where a CUDA device is asked about).
"""

from __future__ import annotations

from pathlib import Path


def resolve_device(device: str) -> str:
    """'auto' as 'cuda' where a CUDA device is available, else 'cpu'; any other value as it is."""
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX, from /proc/cpuinfo; False where unknown).
    Without it bf16 autocast is emulated: on a 2-core AVX2-only EPYC a forward pass of SmolLM2-135M ran
    at 33 tokens/s in bf16 against 196 in fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def resolve_precision(precision: str, device: str) -> str:
    """'auto' as 'bf16' where `device` ("cpu" or "cuda") computes bf16 natively (a GPU that supports it, a CPU with
    AVX512-BF16 or AMX), else 'fp32'; 'fp32' and 'bf16' as they are. On a 2-core AVX2-only CPU emulated bf16 ran a
    2048-wide linear layer at 21 GFLOP/s against 139 in fp32 (bench/precision.py): auto keeps such a CPU in fp32."""
    if precision != "auto":
        return precision
    if device == "cuda":
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"
