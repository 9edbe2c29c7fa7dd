"""Load any causal LM that transformers can load, or a vision-language model of a supported
family with its processor, and describe it for the engine."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config
from .demo import ensure_demo_model
from .demo_vl import ensure_demo_vl_model

# The embedded models, built locally on first use.
DEMO_MODELS = {"demo": ensure_demo_model, "demo-vl": ensure_demo_vl_model}

_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says why and what to check."""


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    name: str  # the id served by the API
    source: str  # the path or hub id it was loaded from
    device: Any  # torch.device
    dtype: Any  # torch.dtype
    context_length: int
    eos_token_ids: frozenset[int]
    pad_token_id: int
    vocab_size: int  # token ids the model can embed (the tokenizer may know more)
    accepts_position_ids: bool
    accepts_logits_to_keep: bool
    has_chat_template: bool
    # The forward's KV-cache argument: "cache" (transformers 5.x) or "past_key_values" (older).
    cache_argument: str = "past_key_values"
    # The most characters of text one token stands for (its longest vocabulary entry): a text
    # of n characters is at least n / this many tokens, known before tokenizing it.
    max_token_chars: int = 1
    processor: Any = None  # the model's processor (images and chat template); VL models only
    vision: Any = None  # a VisionTower; VL models only

    @property
    def accepts_images(self) -> bool:
        return self.vision is not None

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def resolve_device(requested: str):
    import torch

    if requested == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"--device {requested}: torch sees no CUDA GPU "
                f"(torch {torch.__version__}, CUDA build {torch.version.cuda})"
            )
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise ModelLoadError(
                f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
        device = torch.device("cuda", index)
    return device


def resolve_dtype(requested: str, device, checkpoint_dtype):
    import torch

    if requested != "auto":
        return getattr(torch, _DTYPES[requested])
    if device.type == "cpu":
        return torch.float32  # half precision is slow or unsupported on most CPUs
    if isinstance(checkpoint_dtype, str):
        checkpoint_dtype = getattr(torch, checkpoint_dtype, None)
    if checkpoint_dtype in (torch.float16, torch.bfloat16):
        return checkpoint_dtype
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def context_length(model_config, tokenizer, override: int | None) -> int:
    """Tokens of one full context: the override (never above the model's position limit),
    else the config's, else the tokenizer's."""
    # A vision-language config keeps the text model's length in its text config.
    text_config = getattr(model_config, "text_config", None)
    for attr in ("max_position_embeddings", "seq_length", "n_positions", "max_sequence_length"):
        value = getattr(text_config, attr, None) or getattr(model_config, attr, None)
        if isinstance(value, int) and value > 0:
            if override and override > value:
                # Positions past the model's own limit are garbage, or an index error mid-run.
                raise ModelLoadError(
                    f"--max-model-len {override} is above the model's limit of {value} tokens "
                    f"({attr} in its config); use at most {value}"
                )
            return override or value
    if override:
        return override
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 10**7:
        return value
    raise ModelLoadError("the model's context length is not in its config; set --max-model-len")


def _eos_ids(model, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def checkpoint_dtype(model_config) -> Any:
    """The dtype the checkpoint's config names (a torch.dtype, a string, or None)."""
    # Newer configs call it dtype; reading the old torch_dtype attribute warns.
    return getattr(model_config, "dtype", None) or vars(model_config).get("torch_dtype")


def model_source(config: Config) -> str:
    """The path or hub id to load: the demo model is built first if needed."""
    build = DEMO_MODELS.get(config.model)
    if build is not None:
        return str(build(config.demo_dir))
    return config.model


def is_vision_language(model_config) -> bool:
    from .vision import VISION_MODEL_TYPES

    return getattr(model_config, "model_type", None) in VISION_MODEL_TYPES


def load_model(config: Config) -> LoadedModel:
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoTokenizer,
    )

    device = resolve_device(config.device)
    source = model_source(config)
    local = Path(source).exists()
    try:
        model_config = AutoConfig.from_pretrained(
            source, trust_remote_code=config.trust_remote_code
        )
        tokenizer = AutoTokenizer.from_pretrained(
            source, trust_remote_code=config.trust_remote_code
        )
    except Exception as exc:  # transformers raises many kinds; all mean "cannot load"
        where = "directory" if local else "hub id (is the hub reachable from here?)"
        raise ModelLoadError(
            f"cannot load the config or tokenizer of {source!r} as a {where}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    dtype = resolve_dtype(config.dtype, device, checkpoint_dtype(model_config))
    vision_language = is_vision_language(model_config)
    auto_class = AutoModelForImageTextToText if vision_language else AutoModelForCausalLM
    try:
        model = auto_class.from_pretrained(
            source, dtype=dtype, trust_remote_code=config.trust_remote_code
        )
    except Exception as exc:
        raise ModelLoadError(
            f"cannot load the weights of {source!r}: {type(exc).__name__}: {exc}"
        ) from exc
    model.to(device)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token else tokenizer.unk_token
    parameters = inspect.signature(model.forward).parameters
    processor = vision = None
    if vision_language:
        processor, vision = _vision_parts(source, model, model_config, tokenizer, config)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=config.model_name,
        source=source,
        device=device,
        dtype=next(model.parameters()).dtype,
        context_length=context_length(model.config, tokenizer, config.max_model_len),
        eos_token_ids=_eos_ids(model, tokenizer),
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        vocab_size=min(len(tokenizer), model.get_input_embeddings().num_embeddings),
        accepts_position_ids="position_ids" in parameters,
        accepts_logits_to_keep="logits_to_keep" in parameters,
        cache_argument="cache" if "cache" in parameters else "past_key_values",
        max_token_chars=max((len(token) for token in tokenizer.get_vocab()), default=1),
        has_chat_template=bool(
            getattr(tokenizer, "chat_template", None) or getattr(processor, "chat_template", None)
        ),
        processor=processor,
        vision=vision,
    )


def _vision_parts(source: str, model, model_config, tokenizer, config: Config):
    """The processor, with ``--max-image-pixels`` applied, and the engine's view of the vision
    tower."""
    from ..vision.processor import ProcessorLoadError, load_processor
    from .vision import VisionTower

    if not VisionTower.supports(model):
        raise ModelLoadError(
            f"{type(model).__name__} has no get_image_features/get_rope_index: "
            "this vision-language model is not supported"
        )
    try:
        processor = load_processor(
            source, model_config.model_type, tokenizer, config.trust_remote_code
        )
    except ProcessorLoadError as exc:
        raise ModelLoadError(str(exc)) from exc
    if config.max_image_pixels is not None:
        set_max_pixels(processor.image_processor, config.max_image_pixels)
    return processor, VisionTower(model)


def set_max_pixels(image_processor, max_pixels: int) -> None:
    """Scale larger images down to at most ``max_pixels`` pixels.

    These families keep the budget as ``size["longest_edge"]`` (what vLLM's and SGLang's
    ``max_pixels`` sets for Qwen-VL), but GLM-4.1V's resize counts a still image as two frames
    (its temporal patch), so the same figure there allows images of half as many pixels. The
    budget is therefore calibrated on the processor itself: set, measured on a huge image, and
    scaled when the result comes out a whole factor smaller.
    """
    _set_longest_edge(image_processor, max_pixels)
    measured = resized_pixels(image_processor, 20_000, 20_000)
    frames = getattr(image_processor, "temporal_patch_size", 1)
    if measured and isinstance(frames, int) and frames > 1 and measured * 1.5 < max_pixels:
        _set_longest_edge(image_processor, max_pixels * frames)
        if (resized_pixels(image_processor, 20_000, 20_000) or 0) > max_pixels:
            _set_longest_edge(image_processor, max_pixels)  # not that layout after all


def _set_longest_edge(image_processor, value: int) -> None:
    size = dict(image_processor.size)
    size["longest_edge"] = value
    if size.get("shortest_edge") and size["shortest_edge"] > value:
        size["shortest_edge"] = value
    image_processor.size = type(image_processor.size)(**size)


def resized_pixels(image_processor, width: int, height: int) -> int | None:
    """Pixels an image of this size has after the processor's resize (None if it cannot say)."""
    count = getattr(image_processor, "get_number_of_image_patches", None)
    patch = getattr(image_processor, "patch_size", None)
    if count is None or not isinstance(patch, int):
        return None
    return int(count(height, width, {})) * patch * patch
