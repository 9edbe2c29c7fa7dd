"""The running batch and its KV cache: rows, left padding, merging a new group into a running
batch, dropping rows, cutting back a failed step, and trimming padding nobody uses.

The engine decides when; these helpers only reshape tensors. A batch can grow or be cut back
only when its cache is *mergeable*: a transformers DynamicCache of plain full-attention layers
(keys and values of shape [batch, heads, length, head size]); other caches (sliding-window or
recurrent layers, legacy tuples) can lose rows but not gain them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .detokenizer import IncrementalDetokenizer
from .request import GenerationRequest
from .sampling import BatchSampler


@dataclass
class Row:
    request: GenerationRequest
    detokenizer: IncrementalDetokenizer | None
    done: bool = False
    preempted: bool = False  # out of the batch after an OOM, to be prefilled again


@dataclass
class Batch:
    rows: list[Row]
    cache: Any  # a transformers Cache, or a legacy tuple of (key, value) per layer
    attention_mask: torch.Tensor  # [B, L]
    positions: torch.Tensor  # [B] position id of each row's next token
    last_tokens: torch.Tensor  # [B]
    sampler: BatchSampler
    suppress_eos: torch.Tensor | None = field(default=None)  # indices of rows that may not end yet

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def mergeable(self) -> bool:
        return mergeable(self.cache)

    def append(self, new: Batch) -> None:
        """Append the rows of a freshly prefilled batch, left-padding the shorter of the two
        (cache and attention mask) to the same length. Both caches must be mergeable; the
        sampler and EOS suppression are the caller's to rebuild."""
        width = max(self.attention_mask.shape[1], new.attention_mask.shape[1])
        pad_old = width - self.attention_mask.shape[1]
        pad_new = width - new.attention_mask.shape[1]
        for old_layer, new_layer in zip(self.cache.layers, new.cache.layers, strict=True):
            old_layer.keys = torch.cat(
                [left_pad(old_layer.keys, pad_old, -2), left_pad(new_layer.keys, pad_new, -2)],
                dim=0,
            )
            old_layer.values = torch.cat(
                [left_pad(old_layer.values, pad_old, -2), left_pad(new_layer.values, pad_new, -2)],
                dim=0,
            )
        self.attention_mask = torch.cat(
            [left_pad(self.attention_mask, pad_old, 1), left_pad(new.attention_mask, pad_new, 1)],
            dim=0,
        )
        self.positions = torch.cat([self.positions, new.positions])
        self.last_tokens = torch.cat([self.last_tokens, new.last_tokens])
        self.rows.extend(new.rows)

    def keep(self, indices: Sequence[int]) -> None:
        """Keep only the rows at ``indices`` (in the cache too); the sampler and EOS suppression
        are the caller's to rebuild."""
        index = torch.tensor(indices, dtype=torch.long, device=self.attention_mask.device)
        self.cache = select_cache(self.cache, index)
        self.rows = [self.rows[i] for i in indices]
        self.attention_mask = self.attention_mask.index_select(0, index)
        self.positions = self.positions.index_select(0, index)
        self.last_tokens = self.last_tokens.index_select(0, index)

    def rewind(self, mask: torch.Tensor, positions: torch.Tensor) -> None:
        """Put the batch back as it was before a failed decode step (``mask`` and ``positions``
        from before it): the layers that ran before the failure had already appended this
        step's keys and values."""
        length = mask.shape[1]
        self.attention_mask, self.positions = mask, positions
        for layer in self.cache.layers:
            layer.keys = layer.keys[:, :, :length, :]
            layer.values = layer.values[:, :, :length, :]

    def trim_padding(self) -> None:
        """Drop cache columns that are padding in every remaining row."""
        if not self.mergeable:
            return
        used = self.attention_mask.any(dim=0).nonzero()
        first = int(used[0]) if used.numel() else 0
        if first == 0:
            return
        self.attention_mask = self.attention_mask[:, first:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[:, :, first:, :]
            layer.values = layer.values[:, :, first:, :]

    def update_eos_suppression(self) -> None:
        """Note the rows that may not end yet: ``ignore_eos``, or fewer than ``min_tokens``."""
        rows = [
            i
            for i, row in enumerate(self.rows)
            if row.request.params.ignore_eos
            or len(row.request.output_ids) < row.request.params.min_tokens
        ]
        self.suppress_eos = (
            torch.tensor(rows, dtype=torch.long, device=self.attention_mask.device)
            if rows
            else None
        )


def prefill_groups(rows: Sequence[Row]) -> list[list[Row]]:
    """How new rows are prefilled: the text-only ones together, each one with images alone (its
    vision encoder pass and its long prompt of image tokens are its own; its decode then joins
    the shared batch)."""
    text = [row for row in rows if row.request.vision is None]
    groups = [text] if text else []
    groups += [[row] for row in rows if row.request.vision is not None]
    return groups


def mergeable(cache: Any) -> bool:
    """True for a DynamicCache made only of plain full-attention layers."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError:
        return False
    return (
        type(cache) is DynamicCache
        and bool(getattr(cache, "layers", None))
        and all(type(layer) is DynamicLayer for layer in cache.layers)
    )


def left_padded(sequences: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, L] right-aligned with ``pad`` before them, and their attention mask."""
    width = max(len(ids) for ids in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, tokens in enumerate(sequences):
        n = len(tokens)
        ids[i, width - n :] = torch.tensor(tokens, dtype=torch.long)
        mask[i, width - n :] = 1
    return ids, mask


def left_pad(tensor: torch.Tensor, amount: int, dim: int) -> torch.Tensor:
    if amount == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = amount
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def select_cache(cache: Any, keep: torch.Tensor) -> Any:
    if isinstance(cache, tuple):
        return tuple(tuple(t.index_select(0, keep) for t in layer) for layer in cache)
    cache.batch_select_indices(keep)
    return cache
