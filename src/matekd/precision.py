"""Numeric precision of training and inference: bf16 autocast with channels_last, or fp32.

`params.precision` (auto | fp32 | bf16) is resolved once per process by the stage that starts
(`use_precision`); the loop, the caches and evaluation ask `bf16_enabled(device)`. Before any
stage has resolved it (direct library use, unit tests) CUDA uses bf16 and the CPU fp32.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path
from typing import Literal

import torch

from .errors import MatekdError

Precision = Literal["fp32", "bf16"]
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 instructions that make bf16 GEMMs native (oneDNN uses them)

_active: Precision | None = None


@functools.cache
def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (read from /proc/cpuinfo flags on Linux x86,
    from the Arm feature list on aarch64). Without it bf16 is emulated and slower than fp32."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "bf16" in flags
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def resolve_precision(choice: str, device: torch.device) -> Precision:
    """`auto`: bf16 on CUDA and on CPUs with native bf16, fp32 elsewhere."""
    if choice == "auto":
        return "bf16" if device.type == "cuda" or cpu_supports_bf16() else "fp32"
    if choice not in ("fp32", "bf16"):
        raise MatekdError(f"precision: {choice!r} is not one of auto, fp32, bf16")
    return choice  # type: ignore[return-value]


def use_precision(choice: str, device: torch.device) -> Precision:
    """Resolve `choice` for `device` and make it this process's precision; returns it."""
    global _active
    _active = resolve_precision(choice, device)
    return _active


def reset_precision() -> None:
    """Back to the library default (no stage has resolved the param)."""
    global _active
    _active = None


def active_precision(device: torch.device) -> Precision:
    """The precision in force on `device`: the resolved param, or the library default."""
    if _active is not None:
        return _active
    return "bf16" if device.type == "cuda" else "fp32"


def bf16_enabled(device: torch.device) -> bool:
    return active_precision(device) == "bf16"


def autocast(device: torch.device):
    """bf16 autocast where the precision says so; otherwise a disabled (fp32) context."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_enabled(device))


def memory_format(device: torch.device) -> torch.memory_format:
    """channels_last with bf16 (what oneDNN and cuDNN run fastest), plain NCHW with fp32."""
    return torch.channels_last if bf16_enabled(device) else torch.contiguous_format
