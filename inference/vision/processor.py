"""The model's own processor for images and chat prompts (AutoProcessor), loaded beside the
model; where torchvision is missing (a CPU install of torch), the same processor class is built
for images only, with the image processor's Pillow backend.

Why the fallback: transformers' processors for GLM-4.1V and Qwen-VL also hold a video processor,
which needs torchvision, and refuse to be built without one; this server reads no video, and the
image processor has a Pillow implementation that gives the same patches.
"""

from __future__ import annotations

import copy
from typing import Any

from loguru import logger


class ProcessorLoadError(RuntimeError):
    pass


def _images_only(processor_class: type) -> type:
    """``processor_class`` accepting no video processor (its init checks every part's class)."""

    class ImagesOnlyProcessor(processor_class):
        def check_argument_for_proper_class(self, argument_name: str, argument: Any):
            if argument is None and argument_name == "video_processor":
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    ImagesOnlyProcessor.__name__ = f"{processor_class.__name__}ImagesOnly"
    return ImagesOnlyProcessor


def load_processor(source: str, model_type: str, tokenizer: Any, trust_remote_code: bool) -> Any:
    from transformers import AutoImageProcessor, AutoProcessor
    from transformers.utils import is_torchvision_available

    try:
        return AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - any failure: try the images-only build, else say
        if is_torchvision_available():
            raise ProcessorLoadError(
                f"cannot load the processor of {source!r}: {type(exc).__name__}: {exc}"
            ) from exc
        first = exc
    import transformers
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    class_name = PROCESSOR_MAPPING_NAMES.get(model_type)
    processor_class = getattr(transformers, class_name, None) if class_name else None
    if processor_class is None:
        raise ProcessorLoadError(
            f"cannot load the processor of {source!r} ({type(first).__name__}: {first}), and "
            f"transformers names no processor class for model type {model_type!r}"
        ) from first
    try:
        image_processor = AutoImageProcessor.from_pretrained(
            source, backend="pil", trust_remote_code=trust_remote_code
        )
        chat_template = getattr(tokenizer, "chat_template", None)
        processor = _images_only(processor_class)(
            image_processor=image_processor,
            # Its own copy: the API tokenizes text prompts with the other one meanwhile, and fast
            # tokenizers are not safe to share across threads.
            tokenizer=copy.deepcopy(tokenizer),
            video_processor=None,
            chat_template=chat_template,
        )
    except Exception as exc:
        raise ProcessorLoadError(
            f"cannot build the processor of {source!r} for images: {type(exc).__name__}: {exc}"
        ) from exc
    logger.info(
        "torchvision is not installed: images go through {} with the Pillow image "
        "processor (video is not supported)",
        processor_class.__name__,
    )
    return processor
