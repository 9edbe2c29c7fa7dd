"""The vision side of a vision-language model, as the engine drives it: encode a request's
images, and place its prompt in the model's 3-D rotary positions.

Supported: the families whose transformers models expose ``get_image_features`` and
``get_rope_index`` and take the encoder's output back through ``mm_encoder_outputs``
(GLM-4.1V, Qwen2-VL, Qwen2.5-VL, Qwen3-VL). The engine encodes the images itself, rather than
letting ``forward`` do it, so that the vision tower is a stage of its own (timed, watched by the
watchdog, a place for fault injection), and it computes the positions itself, because the
model would keep one request's rotary offset on the model object (``rope_deltas``), which a
batch of many requests cannot share.
"""

from __future__ import annotations

from typing import Any

import torch

# transformers model types with that interface (their configs' ``model_type``).
VISION_MODEL_TYPES = ("glm4v", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")


class VisionTower:
    def __init__(self, model: Any):
        self.core = model.model  # e.g. Glm4vModel: the vision tower, the text model, the rope
        self.encoder = self.core.visual

    @staticmethod
    def supports(model: Any) -> bool:
        core = getattr(model, "model", None)
        return all(
            hasattr(core, name) for name in ("get_image_features", "get_rope_index", "visual")
        )

    def language_model(self) -> Any:
        """The text model (its decoder layers), or None where the family names it otherwise."""
        return getattr(self.core, "language_model", None)

    def middle_block(self) -> Any:
        """The vision block in the middle of the tower (for fault injection)."""
        blocks = getattr(self.encoder, "blocks", None)
        return blocks[len(blocks) // 2] if blocks else self.encoder

    def encode(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> Any:
        """The images' embeddings, as ``forward`` takes them back in ``mm_encoder_outputs``."""
        return self.core.get_image_features(pixel_values, image_grid_thw, return_dict=True)

    def positions(
        self,
        input_ids: torch.Tensor,
        mm_token_type_ids: torch.Tensor,
        image_grid_thw: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """3-D position ids [3, B, L] of a (left-padded) prompt, and each row's next position:
        the text positions after the prompt continue from the largest image position."""
        position_ids, deltas = self.core.get_rope_index(
            input_ids,
            mm_token_type_ids=mm_token_type_ids,
            image_grid_thw=image_grid_thw,
            attention_mask=attention_mask,
        )
        next_positions = attention_mask.sum(-1) + deltas.view(-1).to(attention_mask.device)
        return position_ids, next_positions
