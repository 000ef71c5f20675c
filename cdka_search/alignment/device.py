"""Where reference energies and gradient probes run: ``cpu``, ``cuda`` (``cuda:N``) or ``auto``."""

from __future__ import annotations

import torch

from cdka_search.errors import ReferenceFileError

def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """The torch device for ``name``: ``auto`` is CUDA where present, else the CPU.

    The same code runs on either; a CUDA device that is absent is a ReferenceFileError, never a
    silent fall back to the CPU.
    """
    if isinstance(name, torch.device):
        return name
    text = (name or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ReferenceFileError(f"--device {name}: no CUDA device is available here; use --device cpu or auto")
        index = int(text[5:]) if ":" in text else 0
        if index >= torch.cuda.device_count():
            raise ReferenceFileError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
        return torch.device("cuda", index)
    raise ReferenceFileError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")


def fast_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices natively, so they cost about half of float32.

    CPUs without AVX512-BF16 (or AMX) emulate it and are slower than float32; torch only exposes the
    CPU check privately, so its absence reads as "no".
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(check is not None and check())
