"""Argument normalisation and validation shared by the NaN ops (errors name the argument)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

IntPair = int | tuple[int, int] | Sequence[int]


def pair(value: IntPair, name: str, *, minimum: int) -> tuple[int, int]:
    """Return ``value`` as an ``(h, w)`` pair of ints ``>= minimum``; ValueError naming ``name``."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        out = (value, value)
    elif isinstance(value, Sequence) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        out = (int(value[0]), int(value[1]))
    else:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(out) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return out


def check_input(x: torch.Tensor, name: str = "input") -> tuple[torch.Tensor, bool]:
    """Accept a float (N, C, H, W) or (C, H, W) tensor; return it as 4-D and whether it was 3-D."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (3, 4):
        raise ValueError(
            f"{name} must be 3-D (C, H, W) or 4-D (N, C, H, W), got shape {tuple(x.shape)}"
        )
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(
            f"{name} must be a floating-point tensor (float32 or float64), got {x.dtype}"
        )
    if x.dim() == 3:
        return x.unsqueeze(0), True
    return x, False


def check_choice(value: str, name: str, choices: Sequence[str]) -> str:
    """ValueError naming ``name`` and the accepted values unless ``value`` is one of ``choices``."""
    if value not in choices:
        accepted = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {accepted}, got {value!r}")
    return value


def check_tie_limit(value: int | None) -> int | None:
    """ValueError unless ``value`` is None or an int >= 1."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"tie_limit must be None or an int >= 1, got {value!r}")
    return value


def check_fraction(value: float, name: str) -> float:
    """ValueError unless ``value`` is a real number in [0, 1]."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}") from None
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return v


def check_nonnegative(value: float, name: str) -> float:
    """ValueError unless ``value`` is a finite real number >= 0."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a non-negative number, got {value!r}") from None
    if not (v >= 0.0 and v != float("inf")):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


def pool_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of a floor-mode pooling / convolution along one axis (dilation folded in)."""
    return (size + 2 * padding - kernel) // stride + 1
