"""What a checkpoint's weight files hold, read from their headers without loading them.

safetensors files are read by their header alone (8 bytes of length, then JSON naming every
tensor's dtype, shape and byte range): ``safetensors.safe_open`` would map the whole file, which
fails for files larger than the address space the machine allows, exactly the files this check
is for. PyTorch ``.bin`` pickles have no cheap header: their size on disk stands for their
contents.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
# Bytes per element of the safetensors dtypes.
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
               "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
               "I64": 8, "U64": 8, "F64": 8}
# Tensors transformers converts to the dtype it loads the model in; others keep theirs.
CONVERTED = {"F16", "BF16", "F32", "F64"}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


class WeightsError(ValueError):
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

    @property
    def parameters(self) -> int | None:
        return sum(self.safetensors.elements.values()) if not self.pickle_bytes else None

    def bytes_as(self, itemsize: int, checkpoint_itemsize: int | None) -> int:
        """Bytes the weights take once loaded with floating tensors in ``itemsize`` bytes."""
        total = 0
        for dtype, count in self.safetensors.elements.items():
            total += count * (itemsize if dtype in CONVERTED else DTYPE_BYTES[dtype])
        if self.pickle_bytes:
            scale = itemsize / checkpoint_itemsize if checkpoint_itemsize else 1.0
            total += int(self.pickle_bytes * scale)
        return total


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """The tensors of a safetensors file; WeightsError when it is truncated or not one."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise WeightsError(f"{path.name} is {size} bytes: not a safetensors file (empty or "
                               "cut short)")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise WeightsError(f"{path.name}: its header claims {length} bytes but the file has "
                               f"{size}: truncated or not a safetensors file")
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
            end = max(end, int(info["data_offsets"][1]))
            if info["dtype"] not in DTYPE_BYTES:
                raise WeightsError(f"{path.name}: tensor {name} has dtype {info['dtype']}, "
                                   "which this check does not know")
        except (KeyError, TypeError, IndexError, ValueError):
            raise WeightsError(f"{path.name}: tensor {name!r} is described wrongly") from None
    expected = 8 + length + end
    if size != expected:
        raise WeightsError(f"{path.name} is {size} bytes but its header describes {expected}: "
                           f"{'truncated (an interrupted download?)' if size < expected else 'has trailing bytes'}")
    return header


def _elements(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count


def read_weights(directory: Path) -> Weights:
    """Every weight file a checkpoint directory names, checked to be present and whole."""
    index_name = next((n for n in INDEX_FILES if (directory / n).is_file()), None)
    if index_name is not None:
        try:
            weight_map = json.loads((directory / index_name).read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise WeightsError(f"{index_name} is not a valid index ({exc})") from None
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more"
                                             if len(missing) > 5 else "")
            raise WeightsError(f"{len(missing)} of the {len(names)} shards that {index_name} "
                               f"names are missing: {shown}")
    else:
        single = next((n for n in SINGLE_FILES if (directory / n).is_file()), None)
        if single is None:
            raise WeightsError(f"no weights in {directory}: neither an index "
                               f"({' nor '.join(INDEX_FILES)}) nor {' nor '.join(SINGLE_FILES)}")
        names, weight_map = [single], None
    weights = Weights([], 0, {}, TensorGroup(), 0, index_name)
    for name in names:
        path = directory / name
        weights.files.append(path)
        weights.bytes_on_disk += path.stat().st_size
        if name.endswith(".safetensors"):
            for tensor, info in read_safetensors_header(path).items():
                weights.tensors[tensor] = name
                weights.safetensors.add(info["dtype"], _elements(info["shape"]))
        else:
            weights.pickle_bytes += path.stat().st_size
    if weight_map is not None and index_name.endswith(".safetensors.index.json"):
        absent = [t for t, f in weight_map.items() if weights.tensors.get(t) != f]
        if absent:
            raise WeightsError(f"{len(absent)} tensor(s) that {index_name} places in a shard are "
                               f"not in it, e.g. {absent[0]} in {weight_map[absent[0]]}: the "
                               "shards do not belong to this index")
    return weights
