"""A chat request with images, made ready for the engine: images decoded (bounded, see
images.py), the chat template applied, and the model's processor run, which resizes the images
to its pixel budget, cuts them into patches and writes one placeholder token per image token.

Runs in a worker thread, never on the event loop: decoding a large PNG takes tens of
milliseconds and ``/health`` must stay fast meanwhile. ``Preprocessing`` keeps the jobs under
way, so that the watchdog can see one that hangs (stage ``vision``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .content import ChatContent
from .images import (
    DecodedImage,
    EncodedImage,
    ImageError,
    ImageLimits,
    check_request_pixels,
    declared_size,
    decode_image,
    read_image_bytes,
)
from .inputs import VisionInputs


@dataclass
class PreprocessJob:
    request_id: str
    trace_id: str
    started_ns: int
    thread_id: int | None = None  # the worker thread doing it, once it runs
    # When the local work (decoding, the processor) began: what the watchdog times. Downloads
    # come before it, bounded by their own deadline: a slow image server is not a stall.
    watched_from_ns: int | None = None
    # Set by the API: called (from the watchdog's thread) to answer the request with an error.
    notify: Callable[[Any], None] | None = None


class Preprocessing:
    """The preprocessing jobs running now (thread-safe); the watchdog reads ``oldest``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[int, PreprocessJob] = {}

    def begin(self, request_id: str, trace_id: str) -> PreprocessJob:
        job = PreprocessJob(request_id, trace_id, time.perf_counter_ns())
        with self._lock:
            self._jobs[id(job)] = job
        return job

    def end(self, job: PreprocessJob) -> None:
        with self._lock:
            self._jobs.pop(id(job), None)

    def running(self, job: PreprocessJob) -> bool:
        with self._lock:
            return id(job) in self._jobs

    def fail_all(self, error: Any) -> None:
        """Answer every request still preprocessing with ``error`` (the engine is stalled)."""
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            if job.notify is not None:
                job.notify(error)

    def count(self) -> int:
        with self._lock:
            return len(self._jobs)

    def oldest(self) -> PreprocessJob | None:
        """The job whose local work began first (None if none is at it)."""
        with self._lock:
            watched = [j for j in self._jobs.values() if j.watched_from_ns is not None]
        return min(watched, key=lambda j: j.watched_from_ns, default=None)


class ImageFailure(Exception):
    """An image of the request could not be used: ``error`` says why, ``param`` where."""

    def __init__(self, error: Exception, param: str):
        super().__init__(str(error))
        self.error = error
        self.param = param


def read_images(content: ChatContent, limits: ImageLimits) -> list[EncodedImage]:
    """Every image's bytes, in order (data URLs and downloads); ImageFailure names the first
    bad one."""
    encoded = []
    for part in content.images:
        try:
            encoded.append(read_image_bytes(part.url, limits))
        except ImageError as exc:
            raise ImageFailure(exc, f"{part.param}.image_url") from None
    return encoded


def decode_images(
    content: ChatContent, encoded: list[EncodedImage], limits: ImageLimits
) -> list[DecodedImage]:
    """The images decoded, in order; ImageFailure names the first bad one."""
    # Every header first: a request whose images are too large together decodes none of them.
    sizes = [declared_size(image) for image in encoded]
    over = check_request_pixels(sizes, limits)
    if over is not None:
        index, error = over
        raise ImageFailure(error, f"{content.images[index].param}.image_url")
    decoded: list[DecodedImage] = []
    for part, image in zip(content.images, encoded, strict=True):
        try:
            decoded.append(decode_image(image, limits))
        except ImageError as exc:
            raise ImageFailure(exc, f"{part.param}.image_url") from None
    return decoded


def template_prompt(processor: Any, messages: list[dict[str, Any]]) -> str:
    """The chat template applied to messages with image placeholders (the processor's own
    template where it has one, else its tokenizer's)."""
    owner = processor if getattr(processor, "chat_template", None) else processor.tokenizer
    return owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def run_processor(
    processor: Any, prompt: str, images: list[DecodedImage], started_ns: int
) -> tuple[list[int], VisionInputs]:
    """The prompt's token ids (one placeholder per image token) and the engine's inputs."""
    out = processor(text=[prompt], images=[d.image for d in images], return_tensors="pt")
    token_types = out["mm_token_type_ids"][0].tolist()
    vision = VisionInputs(
        pixel_values=out["pixel_values"],
        image_grid_thw=out["image_grid_thw"],
        mm_token_type_ids=token_types,
        images=len(images),
        image_tokens=sum(1 for t in token_types if t == 1),
        image_sizes=tuple((d.width, d.height) for d in images),
        encoded_bytes=sum(d.encoded_bytes for d in images),
        preprocess_started_ns=started_ns,
        preprocess_finished_ns=time.perf_counter_ns(),
    )
    return out["input_ids"][0].tolist(), vision
