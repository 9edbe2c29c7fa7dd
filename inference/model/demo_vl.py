"""The embedded vision-language model, ``--model demo-vl``: a tiny GLM-4.1V built locally.

It is the architecture of GLM-4.1V-9B-Thinking and AutoGLM-Phone-9B
(``Glm4vForConditionalGeneration``: a vision tower whose patches are merged 2x2 into image tokens,
3-D rotary positions for the text model), with seeded random weights, GLM's image special tokens
in a byte-level tokenizer, GLM's chat template, and the model's own image processor. It is saved
with ``save_pretrained`` and loaded back like any checkpoint, so the server reads it through the
same processor and model classes as the real one.

Its image processor's ``max_pixels`` is small (a phone screenshot becomes about a hundred image
tokens instead of about eight hundred), so that a test request takes a fraction of a second on a
CPU; ``--max-image-pixels`` raises it as for any model.
"""

from __future__ import annotations

import os
from pathlib import Path

from .demo import EOS_TOKEN, build_byte_tokenizer, build_once, seeded_printable_model

RECIPE_VERSION = 3
IMAGE_TOKENS = (
    "<|image|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|video|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
)
ROLE_TOKENS = ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
MAX_PIXELS = 28 * 28 * 256  # at most 256 image tokens per image
MIN_PIXELS = 28 * 28 * 4

# GLM-4.1V-9B-Thinking's chat template, images and text parts in order (its thinking and
# metadata branches left out: the demo writes no <think> blocks).
CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{%- for msg in messages %}"
    "{%- if msg.role == 'system' %}<|system|>\n{{ msg.content }}"
    "{%- elif msg.role == 'user' %}<|user|>{{ '\\n' }}"
    "{%- if msg.content is string %}{{ msg.content }}"
    "{%- else %}{%- for item in msg.content %}"
    "{%- if item.type == 'video' or 'video' in item %}<|begin_of_video|><|video|><|end_of_video|>"
    "{%- elif item.type == 'image' or 'image' in item %}<|begin_of_image|><|image|><|end_of_image|>"
    "{%- elif item.type == 'text' %}{{ item.text }}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{%- elif msg.role == 'assistant' %}<|assistant|>{{ '\\n' }}"
    "{%- if msg.content is string %}{{ msg.content }}"
    "{%- else %}{%- for item in msg.content %}{{ item.text }}{%- endfor %}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def demo_vl_model_path(cache_root: str | os.PathLike) -> Path:
    return Path(cache_root) / f"demo-glm4v-v{RECIPE_VERSION}"


def ensure_demo_vl_model(cache_root: str | os.PathLike) -> Path:
    """Return the directory of the demo vision-language checkpoint, building it if missing."""
    return build_once(demo_vl_model_path(cache_root), RECIPE_VERSION, _save)


def _config(tokenizer):
    from transformers import Glm4vConfig

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in IMAGE_TOKENS}
    eos = [tokenizer.convert_tokens_to_ids(t) for t in (EOS_TOKEN, "<|user|>", "<|observation|>")]
    return Glm4vConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            # Room for Open-AutoGLM's requests: its Chinese system prompt alone is 7,909 bytes
            # (a token each here), and it asks for 3,000 tokens; its vLLM command serves 25,480.
            "max_position_embeddings": 32768,
            # GLM-4.1V's rotary layout scaled down: half the head rotates, split 2:3:3 over
            # time, height and width (the real model: 8:12:12 of 64).
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 3, 3],
                "partial_rotary_factor": 0.5,
            },
            "eos_token_id": eos,
            "pad_token_id": tokenizer.pad_token_id,
            # Wider random weights than transformers' 0.02: the output then depends clearly on
            # the positions and the image, so that a wrong rotary offset changes the answer.
            "initializer_range": 0.1,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 64,
            "num_heads": 2,
            "intermediate_size": 128,
            "out_hidden_size": 128,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "image_size": 336,
            "initializer_range": 0.1,
        },
        image_token_id=ids["<|image|>"],
        video_token_id=ids["<|video|>"],
        image_start_token_id=ids["<|begin_of_image|>"],
        image_end_token_id=ids["<|end_of_image|>"],
        video_start_token_id=ids["<|begin_of_video|>"],
        video_end_token_id=ids["<|end_of_video|>"],
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
    )


def _save(staging: Path) -> None:
    from transformers import Glm4vForConditionalGeneration
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    tokenizer = build_byte_tokenizer(CHAT_TEMPLATE, IMAGE_TOKENS + ROLE_TOKENS)
    config = _config(tokenizer)
    model = seeded_printable_model(
        Glm4vForConditionalGeneration, config, 20261129, config.eos_token_id, config.pad_token_id
    )
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    # GLM-4.1V's image processor (patch 14, merge 2, temporal patch 2, CLIP normalisation), with
    # a small pixel budget for the CPU.
    Glm4vImageProcessorPil(
        size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    ).save_pretrained(staging)
