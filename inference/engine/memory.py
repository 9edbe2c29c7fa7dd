"""GPU memory: the KV-cache size of a request, estimated from the model's configuration, and the
memory the CUDA device has left for it (admission control), plus the figures an OOM error names.

The estimate is 2 (keys and values) x layers x KV heads x head size x bytes per element for each
token of prompt plus ``max_tokens``; models that keep their cache another way (multi-head latent
attention, recurrent layers) get no estimate, and then no admission control.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

MIB = 1024 * 1024


@dataclass(frozen=True)
class KvCacheShape:
    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    def bytes_for(self, tokens: int) -> int:
        return tokens * self.bytes_per_token


def _first_int(config: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def kv_cache_shape(model_config: Any, dtype_bytes: int) -> KvCacheShape | None:
    """The per-token KV-cache layout of a transformers config, or None when it is not a plain
    multi-head (or grouped-query) attention cache."""
    config = getattr(model_config, "text_config", None) or model_config
    if getattr(config, "kv_lora_rank", None):  # multi-head latent attention: another layout
        return None
    layers = _first_int(config, "num_hidden_layers", "num_layers", "n_layer")
    heads = _first_int(config, "num_attention_heads", "n_head")
    # ChatGLM/GLM-4 checkpoints call them multi_query_group_num and kv_channels.
    kv_heads = _first_int(config, "num_key_value_heads", "multi_query_group_num") or heads
    head_dim = _first_int(config, "head_dim", "kv_channels")
    hidden = _first_int(config, "hidden_size", "n_embd")
    if head_dim is None and hidden and heads:
        head_dim = hidden // heads
    if not (layers and kv_heads and head_dim):
        return None
    return KvCacheShape(layers, kv_heads, head_dim, dtype_bytes)


# Allocation failures that libraries below PyTorch report as plain RuntimeErrors.
_ALLOCATION_FAILURES = ("out of memory", "ALLOC_FAILED", "cudaErrorMemoryAllocation")
# cuDNN's attention reports a failed workspace allocation only as a failed graph execution
# (seen on an H100 with torch 2.11 when another process held the rest of the GPU).
_CUDNN_FAILURES = ("mha_graph.execute", "CUDNN_STATUS_EXECUTION_FAILED")
NEARLY_FULL_BYTES = 256 * MIB


def is_out_of_memory(exc: BaseException, device: Any) -> bool:
    """True for PyTorch's OOM, for allocation failures of cuBLAS and others, and for a cuDNN
    execution failure while the device is nearly full."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    if not isinstance(exc, RuntimeError) or getattr(device, "type", None) != "cuda":
        return False
    text = str(exc)
    if any(marker in text for marker in _ALLOCATION_FAILURES):
        return True
    if any(marker in text for marker in _CUDNN_FAILURES):
        figures = cuda_figures(device)
        return bool(figures) and figures["free"] < NEARLY_FULL_BYTES
    return False


class MemoryProbe(Protocol):
    """The hardware seam for admission control: bytes a new request may still take."""

    def available_bytes(self) -> int: ...


class CudaMemory:
    """Free device memory plus what PyTorch's caching allocator holds but does not use."""

    def __init__(self, device: Any):
        self.device = device

    def available_bytes(self) -> int:
        import torch

        free, _ = torch.cuda.mem_get_info(self.device)
        slack = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        return free + slack


def cuda_figures(device: Any) -> dict[str, int]:
    """Allocated, reserved, free and total bytes of a CUDA device; {} off CUDA or on error."""
    if getattr(device, "type", None) != "cuda":
        return {}
    import torch

    try:
        free, total = torch.cuda.mem_get_info(device)
        return {
            "allocated": torch.cuda.memory_allocated(device),
            "reserved": torch.cuda.memory_reserved(device),
            "free": free,
            "total": total,
        }
    except Exception:  # noqa: BLE001 - the figures are a courtesy; never fail over them
        return {}


def describe_figures(figures: dict[str, int], device: Any) -> str:
    if not figures:
        return ""
    return (
        f"{device}: {figures['allocated'] / MIB:.0f} MiB allocated, "
        f"{figures['reserved'] / MIB:.0f} MiB reserved by PyTorch, "
        f"{figures['free'] / MIB:.0f} MiB free of {figures['total'] / MIB:.0f} MiB"
    )
