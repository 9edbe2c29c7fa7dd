"""Pure conversions from NVML's units to Prometheus base units (tested on literal inputs)."""

from __future__ import annotations


def milliwatts_to_watts(value: int) -> float:
    return value / 1000.0


def millijoules_to_joules(value: int) -> float:
    return value / 1000.0


def megahertz_to_hertz(value: int) -> float:
    return value * 1_000_000.0


def percent_to_ratio(value: int) -> float:
    return value / 100.0


def cuda_version_string(value: int) -> str:
    """NVML's CUDA driver version integer (12040) as 'major.minor' ('12.4')."""
    return f"{value // 1000}.{(value % 1000) // 10}"


def text(value: bytes | str) -> str:
    """NVML strings come as bytes from older bindings, str from newer ones."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def reasons_from_mask(mask: int, known: dict[int, str]) -> dict[str, int]:
    """Every known reason with 1 where its bit is set in NVML's clock-event mask, else 0."""
    return {name: 1 if mask & bit else 0 for bit, name in known.items()}
