"""The vision-language families the README names, in process: Qwen2-VL, Qwen2.5-VL and Qwen3-VL
(tiny checkpoints built here with transformers' own classes) and GLM-4.1V (demo-vl).

For each family: ``load_model`` sees a vision-language model and builds its processor; two image
requests (different images, different sizes) and a text request are preprocessed with the API's
own functions, answered greedily by the real Engine alone and then all three in one batch (the
same tokens), and each answer is the token sequence ``model.generate`` writes for the same
inputs, transformers' reference implementation of the family's 3-D rotary positions.
"""

from __future__ import annotations

import base64
import copy
import io
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image, ImageDraw

from inference.api.prompts import chat_prompt_ids
from inference.api.schemas import ChatMessage
from inference.config import Config
from inference.engine.engine import Engine
from inference.engine.queue import RequestQueue
from inference.engine.request import Failed, Finished, GenerationRequest, SamplingParams
from inference.model.demo import build_byte_tokenizer, seeded_printable_model
from inference.model.loader import LoadedModel, load_model, set_max_pixels
from inference.vision.content import read_messages
from inference.vision.images import ImageLimits
from inference.vision.preprocess import decode_images, read_images, run_processor, template_prompt

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "glm4v")
MAX_TOKENS = 12
PARAMS = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)

# The special tokens the Qwen-VL processors and configs name (Qwen2VLProcessor.__init__ and its
# Qwen2.5-VL and Qwen3-VL siblings look up <|image_pad|> and <|video_pad|>; Qwen3-VL's also
# <|vision_start|> and <|vision_end|>), and the chat turns.
QWEN_TOKENS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Qwen2-VL-7B-Instruct's chat_template.json, as the Qwen2-VL, Qwen2.5-VL checkpoints ship it
# (Qwen3-VL's adds tool calls and thinking around the same image and video parts):
#   {% set image_count = namespace(value=0) %}...{% for message in messages %}
#   {% if loop.first and message['role'] != 'system' %}<|im_start|>system
#   You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n
#   {% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}
#   {% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content
#   or 'image_url' in content %}...<|vision_start|><|image_pad|><|vision_end|>
#   {% elif content['type'] == 'video' or 'video' in content %}...
#   <|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}
#   {{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}
#   {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}
# Here the same, without the "Picture N:" labels (add_vision_id) and video counters.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Five times transformers' default spread of random weights (0.02), in the text model and the
# vision tower: attention sharp enough, and image features strong enough, that a wrong rotary
# position or a lost DeepStack feature changes the greedy answer. At 0.02 the tiny Qwen2-VL wrote
# the same tokens with every position flattened to 1-D; with the text model at 0.1 and the tower
# at 0.02, Qwen3-VL wrote the same tokens without its DeepStack features.
INITIALIZER_RANGE = 0.1


# ---- tiny checkpoints -------------------------------------------------------------------------


def _qwen_config(family: str, tokenizer) -> tuple[Any, type, Any]:
    """The family's config (the text model scaled down from the real one's layout), its model
    class, and its Pillow image processor with a small pixel budget."""
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_TOKENS}
    eos = [tokenizer.eos_token_id, ids["<|im_end|>"]]
    text: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "initializer_range": INITIALIZER_RANGE,
        "bos_token_id": None,
        "eos_token_id": eos,
        "pad_token_id": tokenizer.pad_token_id,
    }
    tokens = {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": False,
    }
    # Qwen2-VL and Qwen2.5-VL: a 14-pixel patch, merged 2x2, CLIP's normalisation.
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 256}
    )
    if family in ("qwen2_vl", "qwen2_5_vl"):
        # head_dim 32: 16 rotary frequencies split 4:6:6 over time, height and width (the real
        # models: 16:24:24 of head_dim 128).
        text["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": 1_000_000.0,
            "mrope_section": [4, 6, 6],
        }
    if family == "qwen2_vl":
        vision = {"depth": 2, "embed_dim": 64, "hidden_size": 128, "mlp_ratio": 2, "num_heads": 2}
        vision["initializer_range"] = INITIALIZER_RANGE
        config = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **tokens)
        return config, transformers.Qwen2VLForConditionalGeneration, image_processor
    if family == "qwen2_5_vl":
        vision = {
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "out_hidden_size": 128,
            "num_heads": 2,
            # Windowed attention (windows of 112 pixels, 4x4 image tokens) in the first block,
            # full attention in the last, as the real tower alternates them.
            "window_size": 112,
            "fullatt_block_indexes": [1],
            "initializer_range": INITIALIZER_RANGE,
        }
        config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
        return config, transformers.Qwen2_5_VLForConditionalGeneration, image_processor
    assert family == "qwen3_vl"
    # head_dim 32: 16 frequencies interleaved 6:5:5 (the real model: 24:20:20 of 64).
    text["head_dim"] = 32
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 5_000_000.0,
        "mrope_section": [6, 5, 5],
        "mrope_interleaved": True,
    }
    vision = {
        "depth": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "out_hidden_size": 128,
        "num_heads": 2,
        "patch_size": 16,
        "num_position_embeddings": 64,  # an 8x8 grid of learned positions, interpolated
        # DeepStack: both blocks' features are added to the first two text layers' states.
        "deepstack_visual_indexes": [0, 1],
        "initializer_range": INITIALIZER_RANGE,
    }
    config = transformers.Qwen3VLConfig(text_config=text, vision_config=vision, **tokens)
    # Qwen3-VL: a 16-pixel patch, merged 2x2, normalised to [-1, 1].
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=16,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        size={"shortest_edge": 64 * 64, "longest_edge": 32 * 32 * 196},
    )
    return config, transformers.Qwen3VLForConditionalGeneration, image_processor


def _build_qwen(family: str, directory: Path) -> None:
    """A tiny checkpoint of ``family`` saved like a real one: config, seeded random weights, a
    byte-level tokenizer with the family's special tokens and chat template, the image
    processor."""

    tokenizer = build_byte_tokenizer(QWEN_CHAT_TEMPLATE, QWEN_TOKENS)
    config, model_class, image_processor = _qwen_config(family, tokenizer)
    # A seed whose greedy choices in these tests all win by at least 0.2 (logits of 50 to 90), so
    # that float rounding (a padded batch, another CPU's kernels) cannot flip a near tie.
    model = seeded_printable_model(
        model_class, config, 20261132, config.text_config.eos_token_id, tokenizer.pad_token_id
    )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    image_processor.save_pretrained(directory)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vl-families")


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, checkpoints, demo_dir) -> tuple[str, LoadedModel]:
    name = request.param
    if name == "glm4v":
        from inference.model.demo_vl import ensure_demo_vl_model

        source = ensure_demo_vl_model(demo_dir)
    else:
        source = checkpoints / name
        _build_qwen(name, source)
    return name, load_model(Config(model=str(source), device="cpu"))


# ---- requests, as the API makes them ----------------------------------------------------------


def _png(size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    """A PNG with some structure: a gradient, a bar of ``colour`` and a dark disc."""
    width, height = size
    image = Image.linear_gradient("L").resize(size).convert("RGB")
    draw = ImageDraw.Draw(image)
    draw.rectangle((width // 8, height // 6, width - width // 8, height // 3), fill=colour)
    draw.ellipse((width // 3, height // 2, width // 3 + width // 4, height // 2 + width // 4), 40)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


IMAGES = {
    "red": _png((320, 200), (220, 30, 30)),  # landscape
    "blue": _png((150, 280), (30, 60, 220)),  # portrait, a different token count
}


@dataclass
class Prepared:
    """One request's preprocessing (done once), from which fresh engine requests are made."""

    name: str
    prompt: str
    prompt_ids: list[int]
    vision: Any  # VisionInputs, or None for text
    images: list[Any]  # the decoded PIL images, for the reference run

    def request(self) -> GenerationRequest:
        return GenerationRequest(
            request_id=self.name,
            prompt_ids=list(self.prompt_ids),
            params=PARAMS,
            stream=False,
            deadline_ns=time.perf_counter_ns() + 600 * 10**9,
            vision=self.vision,
        )


def _prepare(loaded: LoadedModel, name: str, text: str, *images: str) -> Prepared:
    """What the chat API does with a request: read the messages, read and decode the images
    (data: URLs), apply the chat template and run the processor; text alone is tokenized."""
    parts: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": _data_url(IMAGES[image])}} for image in images
    ]
    parts.append({"type": "text", "text": text})
    messages = [ChatMessage(role="user", content=parts)]
    content = read_messages(messages, loaded.name, loaded.accepts_images)
    if not content.has_images:
        ids, prompt = chat_prompt_ids(loaded, content.messages)
        return Prepared(name, prompt, ids, None, [])
    limits = ImageLimits()
    decoded = decode_images(content, read_images(content, limits), limits)
    prompt = template_prompt(loaded.processor, content.messages)
    ids, vision = run_processor(loaded.processor, prompt, decoded, time.perf_counter_ns())
    return Prepared(name, prompt, ids, vision, [d.image for d in decoded])


@pytest.fixture(scope="module")
def prepared(family) -> dict[str, Prepared]:
    _, loaded = family
    question = "What is on the screen?"
    return {
        "red": _prepare(loaded, "red", question, "red"),
        "blue": _prepare(loaded, "blue", question, "blue"),
        "text": _prepare(loaded, "text", "No image here, only text."),
        "both": _prepare(loaded, "both", "Compare the two screens.", "blue", "red"),
    }


# ---- the engine -------------------------------------------------------------------------------


class Recorder:
    """An engine observer that keeps what the engine reports (written by the engine thread,
    read once the requests have ended)."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, int]] = []
        self.formed: list[int] = []
        self.running: list[int] = []

    def step(self, stage: str, batch_size: int) -> None:
        self.steps.append((stage, batch_size))

    def running_changed(self, running: int) -> None:
        self.running.append(running)

    def batch_formed(self, new_requests: int) -> None:
        self.formed.append(new_requests)

    def out_of_memory(self, stage: str) -> None:
        pass

    def admission_refused(self, reason: str) -> None:
        pass

    def fault_fired(self, fault: str, stage: str) -> None:
        pass


def _answer(loaded: LoadedModel, requests: list[GenerationRequest]) -> Recorder:
    """Queue ``requests`` before a fresh engine starts, so that it takes them all in its first
    admission, and wait until each has ended."""
    recorder = Recorder()
    queue = RequestQueue(16)
    engine = Engine(loaded, queue, max_batch_size=8, observer=recorder, seed=0)
    ended = threading.Semaphore(0)
    for request in requests:

        def emit(event, request=request):
            if isinstance(event, (Finished, Failed)):
                ended.release()

        request.emit = emit
        queue.put(request)
    engine.start()
    try:
        for _ in requests:
            assert ended.acquire(timeout=300), "a request never ended"
    finally:
        engine.stop()
    for request in requests:
        assert request.error is None, f"{request.request_id}: {request.error.message}"
        assert request.finish_reason == "length"
        assert len(request.output_ids) == MAX_TOKENS
    return recorder


def _alone(loaded: LoadedModel, item: Prepared) -> list[int]:
    request = item.request()
    recorder = _answer(loaded, [request])
    assert max(size for _, size in recorder.steps) == 1
    return request.output_ids


def _reference(loaded: LoadedModel, item: Prepared) -> list[int]:
    """transformers' own greedy answer to the same inputs: ``generate`` on the processor's
    output, which computes the family's 3-D positions itself (``get_rope_index`` and the
    model's ``rope_deltas``)."""
    if item.vision is None:
        inputs = loaded.tokenizer([item.prompt], add_special_tokens=False, return_tensors="pt")
    else:
        inputs = loaded.processor(text=[item.prompt], images=item.images, return_tensors="pt")
        assert torch.equal(inputs["pixel_values"], item.vision.pixel_values)
    assert inputs["input_ids"][0].tolist() == item.prompt_ids
    with torch.inference_mode():
        out = loaded.model.generate(
            **inputs.to(loaded.device),
            do_sample=False,
            max_new_tokens=MAX_TOKENS,
            min_new_tokens=MAX_TOKENS,
        )
    return out[0, len(item.prompt_ids) :].tolist()


# ---- tests ------------------------------------------------------------------------------------


def test_the_model_loads_as_vision_language_with_its_processor(family, prepared):
    import transformers
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
    from transformers.utils import is_torchvision_available

    name, loaded = family
    assert loaded.model.config.model_type == name
    assert loaded.accepts_images and loaded.has_chat_template
    processor_class = getattr(transformers, PROCESSOR_MAPPING_NAMES[name])
    assert isinstance(loaded.processor, processor_class)
    if not is_torchvision_available():  # the images-only build, with the Pillow image processor
        assert loaded.processor.video_processor is None
        assert type(loaded.processor.image_processor).__name__.endswith("ImageProcessorPil")
    merge = loaded.processor.image_processor.merge_size
    for item in (prepared["red"], prepared["blue"], prepared["both"]):
        vision = item.vision
        assert vision.images == len(item.images) == len(vision.image_grid_thw)
        # One placeholder token per merged patch, each image's between its start and end tokens.
        assert vision.image_tokens == int(vision.image_grid_thw.prod(-1).sum()) // merge**2
        assert vision.mm_token_type_ids.count(1) == vision.image_tokens
        assert len(vision.mm_token_type_ids) == len(item.prompt_ids)
    assert prepared["red"].vision.image_tokens != prepared["blue"].vision.image_tokens
    assert prepared["text"].vision is None


def test_image_and_text_requests_answered_alone_and_in_one_batch_agree(family, prepared):
    """Each request alone, then the two image requests and the text one queued together: the
    engine prefills the text group and each image request (vision tower, 3-D positions) and
    decodes all three as one batch, with the same greedy tokens as alone."""
    _, loaded = family
    names = ("red", "blue", "text")
    alone = {name: _alone(loaded, prepared[name]) for name in names}
    assert alone["red"] != alone["blue"], "different images should give different answers"

    together = [prepared[name].request() for name in names]
    recorder = _answer(loaded, together)
    assert {r.request_id: r.output_ids for r in together} == alone
    # One admission, three prefill groups (the text one, each image request alone), one batch.
    assert recorder.formed == [1, 1, 1]
    assert [size for stage, size in recorder.steps if stage == "vision"] == [1, 1]
    decode_sizes = [size for stage, size in recorder.steps if stage == "decode"]
    assert decode_sizes == [3] * (MAX_TOKENS - 1)
    assert max(recorder.running) == 3
    assert all(r.batch_size_at_prefill >= 1 for r in together)


@pytest.mark.parametrize("name", ["red", "blue", "both", "text"])
def test_the_engine_answers_what_generate_answers(family, prepared, name):
    """The engine's tokens are transformers' reference: ``generate`` with the processor's
    output (one image, another size, two images in one prompt, and text only)."""
    _, loaded = family
    item = prepared[name]
    assert _alone(loaded, item) == _reference(loaded, item)


def test_max_image_pixels_bounds_a_phone_screenshot(family):
    """``--max-image-pixels`` as the loader applies it: a 1080x2400 screenshot is resized to at
    most that many pixels, and not far fewer (the budget is not halved or doubled by the
    family's temporal patch)."""
    _, loaded = family
    budget = 50_000
    image_processor = copy.deepcopy(loaded.processor.image_processor)
    set_max_pixels(image_processor, budget)
    screenshot = Image.new("RGB", (1080, 2400), (200, 200, 200))
    grid = image_processor(images=[screenshot], return_tensors="pt")["image_grid_thw"][0]
    pixels = int(grid[1] * grid[2]) * image_processor.patch_size**2
    assert budget * 0.7 < pixels <= budget
