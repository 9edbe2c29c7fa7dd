"""What preprocessing hands the engine for a request with images (no torch import here: the
tensors are made by the processor, in the serving process, and only typed as Any)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class VisionInputs:
    pixel_values: Any  # torch.Tensor of the images' patches, on the CPU until the prefill
    image_grid_thw: Any  # torch.Tensor [images, 3]: each image's patch grid (time, height, width)
    mm_token_type_ids: list[int]  # per prompt token: 0 text, 1 image
    images: int
    image_tokens: int  # prompt tokens that stand for image patches
    image_sizes: tuple[tuple[int, int], ...]  # (width, height) of each image as received
    encoded_bytes: int  # the images' bytes as received (PNG, JPEG, ...)
    preprocess_started_ns: int  # perf_counter_ns: decoding the images began (after downloads)
    preprocess_finished_ns: int  # perf_counter_ns: the processor's tensors were ready
    download_ns: tuple[int, int] | None = None  # start and end of its http(s) downloads

    @property
    def preprocess_seconds(self) -> float:
        return (self.preprocess_finished_ns - self.preprocess_started_ns) / 1e9
