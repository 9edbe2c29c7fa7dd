"""Batched next-token selection with per-row sampling parameters.

Each row of a batch may have its own temperature, top_p and penalties (OpenAI semantics:
``frequency_penalty`` subtracts penalty x count of the token in the output so far,
``presence_penalty`` subtracts penalty once the token has appeared). The parameters are turned
into tensors once per batch composition, not once per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .request import SamplingParams

MIN_TEMPERATURE = 1e-5


@dataclass
class BatchSampler:
    temperature: torch.Tensor  # [B] float, 1.0 where the row is greedy (unused there)
    top_p: torch.Tensor  # [B]
    greedy: torch.Tensor  # [B] bool
    all_greedy: bool
    frequency_penalty: torch.Tensor | None  # [B], None when no row has a penalty
    presence_penalty: torch.Tensor | None
    token_counts: torch.Tensor | None  # [B, V] counts of each token in the output so far
    eos_ids: torch.Tensor  # [E]
    generator: torch.Generator | None

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        outputs: Sequence[Sequence[int]],
        vocab_size: int,
        eos_ids: Sequence[int],
        device: torch.device,
        generator: torch.Generator | None,
    ) -> BatchSampler:
        # A temperature this close to 0 is greedy in effect, and dividing by it overflows.
        greedy = [p.temperature < MIN_TEMPERATURE for p in params]
        penalized = any(p.penalized for p in params)
        counts = None
        freq = pres = None
        if penalized:
            counts = torch.zeros((len(params), vocab_size), dtype=torch.float32, device=device)
            for row, ids in enumerate(outputs):
                if ids:
                    index = torch.tensor(ids, dtype=torch.long, device=device)
                    counts[row].index_add_(0, index, torch.ones(len(ids), device=device))
            freq = torch.tensor([p.frequency_penalty for p in params], device=device)
            pres = torch.tensor([p.presence_penalty for p in params], device=device)
        return cls(
            temperature=torch.tensor(
                [1.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)],
                device=device,
            ),
            top_p=torch.tensor([p.top_p for p in params], device=device),
            greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            all_greedy=all(greedy),
            frequency_penalty=freq,
            presence_penalty=pres,
            token_counts=counts,
            eos_ids=torch.tensor(sorted(eos_ids), dtype=torch.long, device=device),
            generator=generator,
        )

    def select(self, logits: torch.Tensor, suppress_eos: torch.Tensor | None) -> torch.Tensor:
        """Pick one token per row from logits [B, V]; the rows whose indices are in
        ``suppress_eos`` cannot end."""
        logits = logits.float()
        if self.token_counts is not None:
            logits = logits - self.frequency_penalty[:, None] * self.token_counts
            logits = logits - self.presence_penalty[:, None] * (self.token_counts > 0)
        if suppress_eos is not None and self.eos_ids.numel():
            logits[suppress_eos[:, None], self.eos_ids[None, :]] = float("-inf")
        if self.all_greedy:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits / self.temperature[:, None], dim=-1)
        probs = _top_p_filter(probs, self.top_p)
        # Greedy rows sample from a one-hot row, so one multinomial call serves the batch; a
        # row that is not a distribution (every logit -inf or nan) can then not fail the others.
        greedy = self.greedy | ~torch.isfinite(probs).all(dim=-1)
        if bool(greedy.any()):
            probs = torch.where(
                greedy[:, None],
                torch.nn.functional.one_hot(
                    torch.nan_to_num(logits, nan=-float("inf")).argmax(dim=-1), probs.shape[-1]
                ).to(probs.dtype),
                probs,
            )
        return torch.multinomial(probs, 1, generator=self.generator).flatten()

    def record(self, tokens: torch.Tensor) -> None:
        """Count the tokens just chosen, for the penalties of the next step."""
        if self.token_counts is not None:
            self.token_counts[torch.arange(tokens.shape[0], device=tokens.device), tokens] += 1


def _top_p_filter(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep, per row, the smallest set of most likely tokens whose mass reaches top_p."""
    if bool((top_p >= 1.0).all()):
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p[:, None], 0.0)
    filtered = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return filtered / filtered.sum(dim=-1, keepdim=True)
