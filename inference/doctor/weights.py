"""What a checkpoint's weight files hold, read from their headers without loading them.

safetensors files are read by their header alone (8 bytes of length, then JSON naming every
tensor's dtype, shape and byte range): ``safetensors.safe_open`` would map the whole file, which
fails for files larger than the address space the machine allows, exactly the files this check
is for. PyTorch ``.bin`` pickles have no cheap header: their size on disk stands for their
contents.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

# The files transformers looks for, in its order: the first present is what it loads.
CANDIDATES = (
    ("model.safetensors", False),
    ("model.safetensors.index.json", True),
    ("pytorch_model.bin", False),
    ("pytorch_model.bin.index.json", True),
)
# Bits per element of every safetensors dtype (safetensors 0.8; F4 and F6 are packed).
DTYPE_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "I64": 64,
    "U64": 64,
    "F64": 64,
}
# Tensors transformers converts to the dtype it loads the model in; others keep theirs.
CONVERTED = {"F16", "BF16", "F32", "F64"}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


class WeightsError(Exception):
    """A weight file that is missing, truncated or unreadable; the message names it."""


@dataclass
class TensorGroup:
    """Element counts by safetensors dtype."""

    elements: dict[str, int] = field(default_factory=dict)

    def add(self, dtype: str, count: int) -> None:
        self.elements[dtype] = self.elements.get(dtype, 0) + count


@dataclass
class Weights:
    files: list[Path]
    bytes_on_disk: int
    tensors: dict[str, str]  # tensor name -> file name (safetensors only)
    safetensors: TensorGroup  # contents of the safetensors files
    pickle_bytes: int  # bytes of .bin files, contents unknown
    index: str | None  # the index file, when sharded
    notes: list[str] = field(default_factory=list)  # oddities that do not stop a load
    lm_head: tuple[int, str] | None = None  # elements and dtype of lm_head.weight, if stored
    vision: TensorGroup = field(default_factory=TensorGroup)  # the vision tower's share

    @property
    def parameters(self) -> int | None:
        return sum(self.safetensors.elements.values()) if not self.pickle_bytes else None

    @property
    def exact(self) -> bool:
        """Whether bytes_as() knows every tensor's size (not so for pickles)."""
        return not self.pickle_bytes

    def vision_bytes_as(self, itemsize: int) -> int:
        """Bytes of the vision tower's weights once loaded (0 for a text-only model)."""
        return _sized(self.vision.elements, itemsize)

    def bytes_as(self, itemsize: int, checkpoint_itemsize: int | None, tied: bool = False) -> int:
        """Bytes the weights take once loaded with floating tensors in ``itemsize`` bytes; with
        ``tied`` a stored output layer is not counted (the model shares the embeddings')."""
        elements = dict(self.safetensors.elements)
        if tied and self.lm_head is not None:
            elements[self.lm_head[1]] -= self.lm_head[0]
        total = _sized(elements, itemsize)
        if self.pickle_bytes:
            scale = itemsize / checkpoint_itemsize if checkpoint_itemsize else 1.0
            total += int(self.pickle_bytes * scale)
        return total


def _sized(elements: dict[str, int], itemsize: int) -> int:
    return sum(
        count * itemsize if dtype in CONVERTED else count * DTYPE_BITS[dtype] // 8
        for dtype, count in elements.items()
    )


def is_vision_tensor(name: str) -> bool:
    """A tensor of the vision tower: ``model.visual.*`` in GLM-4.1V and Qwen-VL checkpoints
    saved by transformers 5, ``visual.*`` in older ones."""
    return name.startswith(("model.visual.", "visual."))


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """The tensors of a safetensors file; WeightsError when it is truncated or not one."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise WeightsError(
                f"{path.name} is {size} bytes: not a safetensors file (empty or cut short)"
            )
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise WeightsError(
                f"{path.name}: its header claims {length} bytes but the file has "
                f"{size}: truncated or not a safetensors file"
            )
        try:
            header = json.loads(handle.read(length))
        except ValueError as exc:
            raise WeightsError(f"{path.name}: unreadable header ({exc})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path.name}: unreadable header (not a JSON object)")
    header.pop("__metadata__", None)
    end = 0
    for name, info in header.items():
        try:
            offsets, shape = info["data_offsets"], info["shape"]
            end = max(end, int(offsets[1]))
            if not all(isinstance(d, int) and d >= 0 for d in shape):
                raise TypeError
            if not isinstance(info["dtype"], str):
                raise TypeError
        except (KeyError, TypeError, IndexError, ValueError):
            raise WeightsError(
                f"{path.name}: tensor {name!r} is described wrongly (dtype, shape or data_offsets)"
            ) from None
    expected = 8 + length + end
    if size != expected:
        raise WeightsError(
            f"{path.name} is {size} bytes but its header describes {expected}: "
            f"{'truncated (an interrupted download?)' if size < expected else 'has trailing bytes'}"
        )
    return header


def read_weights(directory: Path) -> Weights:
    """Every weight file transformers would load from a checkpoint directory, checked to be
    present and whole. Disagreements that do not stop a load become ``notes``."""
    chosen = next(((n, sharded) for n, sharded in CANDIDATES if (directory / n).is_file()), None)
    if chosen is None:
        raise WeightsError(
            f"no weights in {directory}: none of {', '.join(n for n, _ in CANDIDATES)}"
        )
    name, sharded = chosen
    weight_map = None
    if sharded:
        try:
            weight_map = json.loads((directory / name).read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
            if not all(isinstance(n, str) for n in names):
                raise TypeError("a shard name is not a string")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise WeightsError(f"{name} is not a valid index ({exc})") from None
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            shown = ", ".join(missing[:5]) + (
                f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            )
            raise WeightsError(
                f"{len(missing)} of the {len(names)} shards that {name} names are missing: {shown}"
            )
    else:
        names = [name]
    weights = Weights([], 0, {}, TensorGroup(), 0, name if sharded else None)
    unknown: set[str] = set()
    for file_name in names:
        path = directory / file_name
        weights.files.append(path)
        weights.bytes_on_disk += path.stat().st_size
        if file_name.endswith(".safetensors"):
            for tensor, info in read_safetensors_header(path).items():
                weights.tensors[tensor] = file_name
                count = math.prod(info["shape"])
                if info["dtype"] not in DTYPE_BITS:
                    unknown.add(info["dtype"])
                    continue
                weights.safetensors.add(info["dtype"], count)
                if is_vision_tensor(tensor):
                    weights.vision.add(info["dtype"], count)
                if tensor == "lm_head.weight":
                    weights.lm_head = (count, info["dtype"])
        else:
            weights.pickle_bytes += path.stat().st_size
    if unknown:
        weights.notes.append(
            f"tensors of dtype {', '.join(sorted(unknown))}, which this check "
            "cannot size, are left out of the size"
        )
    if weight_map is not None and name.endswith(".safetensors.index.json"):
        absent = [t for t, f in weight_map.items() if weights.tensors.get(t) != f]
        if absent:
            weights.notes.append(
                f"{len(absent)} tensor(s) that {name} places in a shard are "
                f"not in it, e.g. {absent[0]} in {weight_map[absent[0]]}"
            )
    return weights
