"""Model checks: the path or hub id resolves, the checkpoint's own code is allowed where it needs
it, config and tokenizer load, every weight file is there and whole, and the weights plus the KV
cache of one full context fit the memory of the device the server would use."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config
from .report import Verdict, failed, first_line, human_bytes, human_count, ok, skipped, warning
from .weights import Weights, WeightsError, read_weights

ROOM_SHARE = 0.9  # of the memory left beside the weights, for a suggested --max-model-len


@dataclass
class ModelFacts:
    """What the model checks learn, shared from one check to the next."""

    directory: Path | None = None
    hub_id: str | None = None  # set when the model will come from the hub at start
    cached_repo: str | None = None  # set when the directory is a snapshot in the hub's cache
    raw_config: dict[str, Any] | None = None
    model_config: Any = None
    tokenizer: Any = None
    weights: Weights | None = None


def _looks_like_path(text: str) -> bool:
    """A path rather than a hub id ("org/name"): absolute, relative to here, or home."""
    return text.startswith(("/", "./", "../", "~", "."))


def source_verdict(config: Config, facts: ModelFacts, offline: bool = False) -> Verdict:
    """Where the checkpoint is. ``offline`` (the start-up checks) never asks the hub."""
    name = "model-source"
    if config.model in ("demo", "demo-vl"):
        from ..model.demo import demo_model_path
        from ..model.demo_vl import demo_vl_model_path
        from ..model.loader import DEMO_MODELS

        path = (demo_model_path if config.model == "demo" else demo_vl_model_path)(config.demo_dir)
        built = not (path / "build.json").is_file()
        facts.directory = DEMO_MODELS[config.model](config.demo_dir)
        return ok(
            name,
            f"the embedded {config.model} model at {facts.directory}"
            + (" (built now)" if built else ""),
            path=str(facts.directory),
        )
    path = Path(config.model).expanduser()
    if path.is_dir():
        facts.directory = path
        return ok(name, f"local directory {path}", path=str(path))
    if path.exists():
        return failed(
            name,
            f"{path} is a file, not a checkpoint directory",
            "give the directory that holds config.json and the weights",
            path=str(path),
        )
    if _looks_like_path(config.model):
        return failed(
            name,
            f"{path} does not exist",
            "check the path (it is read on this machine, inside the container if there is one)",
            path=str(path),
        )
    return _hub_verdict(config.model, facts, offline)


def _hub_verdict(repo_id: str, facts: ModelFacts, offline: bool) -> Verdict:
    name = "model-source"
    from huggingface_hub import HfApi, constants, snapshot_download

    try:
        facts.directory = Path(snapshot_download(repo_id, local_files_only=True))
        facts.cached_repo = repo_id
        return ok(
            name,
            f"hub id {repo_id}, in the local cache at {facts.directory}",
            path=str(facts.directory),
            repo_id=repo_id,
        )
    except Exception:  # noqa: BLE001, S110 - not cached (or not a valid id): ask the hub below
        pass
    if offline:
        facts.hub_id = repo_id
        return skipped(
            name,
            f"{repo_id} is not a local directory nor cached: the server will "
            "download it (run `python -m inference doctor` to check the hub)",
        )
    if constants.HF_HUB_OFFLINE:
        return failed(
            name,
            f"{repo_id} is not a local directory nor in the cache "
            f"({constants.HF_HUB_CACHE}), and HF_HUB_OFFLINE is set",
            "download it first (hf download), or give a local directory",
            repo_id=repo_id,
        )
    try:
        info = HfApi().model_info(repo_id, files_metadata=True, timeout=10)
    except Exception as exc:  # noqa: BLE001 - unreachable hub, unknown repo, no access: all fail
        return failed(
            name,
            f"{repo_id} is not a local directory nor cached "
            f"({constants.HF_HUB_CACHE}), and the hub at {constants.ENDPOINT} "
            f"answered: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
            "give a local directory, download the model on a machine with access "
            "(hf download), or set HF_TOKEN / HF_ENDPOINT",
            repo_id=repo_id,
        )
    size = sum(s.size or 0 for s in info.siblings or [])
    facts.hub_id = repo_id
    return warning(
        name,
        f"{repo_id} is on the hub but not downloaded: the server will download "
        f"{human_bytes(size)} before it can serve",
        "download it ahead (hf download) so that the start is not a long silent "
        "load; raise --load-timeout otherwise",
        repo_id=repo_id,
        bytes=size,
    )


def _needs_directory(name: str, facts: ModelFacts) -> Verdict | None:
    if facts.directory is None:
        why = "downloaded at start" if facts.hub_id else "no checkpoint found"
        return skipped(name, f"needs a local checkpoint ({why})")
    return None


def remote_code_verdict(config: Config, facts: ModelFacts) -> Verdict:
    name = "remote-code"
    if (blocked := _needs_directory(name, facts)) is not None:
        return blocked
    config_file = facts.directory / "config.json"
    try:
        facts.raw_config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        return failed(
            name,
            f"cannot read {config_file}: {exc}",
            "the checkpoint is incomplete: download config.json again",
        )
    from transformers import CONFIG_MAPPING

    model_type = facts.raw_config.get("model_type")
    auto_map = facts.raw_config.get("auto_map") or {}
    native = model_type in CONFIG_MAPPING
    values = dict(
        model_type=model_type,
        native=native,
        auto_map=sorted(auto_map),
        trust_remote_code=config.trust_remote_code,
    )
    import transformers

    if auto_map and config.trust_remote_code:
        return ok(
            name,
            f"model_type {model_type!r}: the checkpoint's own code will run (--trust-remote-code)",
            **values,
        )
    if auto_map and native:
        return ok(
            name,
            f"model_type {model_type!r} ships its own code, but transformers "
            f"{transformers.__version__} has it built in: loaded without that code",
            **values,
        )
    if auto_map:
        return failed(
            name,
            f"model_type {model_type!r} needs the checkpoint's own code "
            f"({', '.join(sorted(auto_map))}) and --trust-remote-code is not given",
            "read the .py files in the checkpoint, then add --trust-remote-code",
            **values,
        )
    if not native:
        return failed(
            name,
            f"transformers {transformers.__version__} does not know model_type "
            f"{model_type!r} and the checkpoint ships no code for it",
            "upgrade transformers (pip install -U transformers)",
            **values,
        )
    return ok(
        name,
        f"model_type {model_type!r} is built into transformers "
        f"{transformers.__version__}; no checkpoint code needed",
        **values,
    )


def config_verdict(config: Config, facts: ModelFacts) -> Verdict:
    name = "model-config"
    if (blocked := _needs_directory(name, facts)) is not None:
        return blocked
    from transformers import AutoConfig

    try:
        facts.model_config = AutoConfig.from_pretrained(
            str(facts.directory), trust_remote_code=config.trust_remote_code
        )
    except Exception as exc:  # noqa: BLE001 - every kind means the same: it does not load
        return failed(
            name,
            f"the config does not load: {type(exc).__name__}: {first_line(exc)}",
            "check config.json, transformers' version and --trust-remote-code",
        )
    from ..model.loader import checkpoint_dtype

    model_config = facts.model_config
    dtype = checkpoint_dtype(model_config)
    return ok(
        name,
        f"{type(model_config).__name__} ({', '.join(model_config.architectures or [])}"
        f"), checkpoint dtype {str(dtype).removeprefix('torch.')}",
        config_class=type(model_config).__name__,
        dtype=str(dtype),
    )


def tokenizer_verdict(config: Config, facts: ModelFacts) -> Verdict:
    name = "tokenizer"
    if (blocked := _needs_directory(name, facts)) is not None:
        return blocked
    from transformers import AutoTokenizer

    try:
        tokenizer = facts.tokenizer = AutoTokenizer.from_pretrained(
            str(facts.directory), trust_remote_code=config.trust_remote_code
        )
    except Exception as exc:  # noqa: BLE001
        return failed(
            name,
            f"the tokenizer does not load: {type(exc).__name__}: {first_line(exc)}",
            "check tokenizer.json / tokenizer_config.json, "
            "the tokenizers version and --trust-remote-code",
        )
    has_template = bool(getattr(tokenizer, "chat_template", None))
    summary = (
        f"{type(tokenizer).__name__}, {len(tokenizer)} tokens, "
        f"{'a' if has_template else 'no'} chat template"
    )
    values = dict(
        tokenizer_class=type(tokenizer).__name__, tokens=len(tokenizer), chat_template=has_template
    )
    if not has_template:
        return warning(
            name,
            summary + ": /v1/chat/completions will answer 400",
            "serve a checkpoint with a chat template, or use /v1/completions",
            **values,
        )
    return ok(name, summary, **values)


def weights_verdict(facts: ModelFacts) -> Verdict:
    name = "model-weights"
    if (blocked := _needs_directory(name, facts)) is not None:
        return blocked
    try:
        weights = facts.weights = read_weights(facts.directory)
    except WeightsError as exc:
        if facts.cached_repo:
            # transformers completes a partial snapshot of the hub's cache when it loads.
            return warning(
                name,
                f"the cached snapshot of {facts.cached_repo} is incomplete: "
                f"{exc}; the server will download the rest at start",
                f"hf download {facts.cached_repo} ahead, so that the start is not a "
                "long silent download",
                path=str(facts.directory),
            )
        return failed(
            name,
            str(exc),
            "download the checkpoint again (hf download resumes and completes it)",
            path=str(facts.directory),
        )
    except OSError as exc:
        return failed(
            name,
            f"cannot read the weights: {exc}",
            "check the files' permissions",
            path=str(facts.directory),
        )
    described = (
        f"{human_count(weights.parameters)} parameters"
        if weights.parameters is not None
        else "PyTorch pickles"
    )
    where = (
        f"{len(weights.files)} shard(s) named by {weights.index}"
        if weights.index
        else weights.files[0].name
    )
    summary = f"{where}, all present and whole: {human_bytes(weights.bytes_on_disk)}, {described}"
    values = dict(
        files=len(weights.files), bytes=weights.bytes_on_disk, parameters=weights.parameters
    )
    if weights.notes:
        return warning(
            name,
            f"{summary}; but {'; '.join(weights.notes)}",
            "check that the shards and the index come from the same download",
            **values,
        )
    return ok(name, summary, **values)


@dataclass(frozen=True)
class DeviceMemory:
    device: str  # cpu, cuda:N
    available: int
    source: str  # where the figure comes from
    others: dict[str, int] = field(default_factory=dict)  # free bytes of the other GPUs


def memory_verdict(
    config: Config,
    facts: ModelFacts,
    device_memory: Callable[[], DeviceMemory | None],
    ram: tuple[int, str] | None = None,
) -> Verdict:
    """``ram`` (bytes free, where from) is checked too when the device is a GPU."""
    name = "memory"
    if facts.weights is None or facts.model_config is None:
        return skipped(name, "needs the weights and the config (see above)")
    import torch

    from ..engine.memory import kv_cache_shape
    from ..model.loader import ModelLoadError, checkpoint_dtype, context_length, resolve_dtype

    memory = device_memory()
    if memory is None:
        return skipped(name, f"--device {config.device} is not usable here (see the GPU checks)")
    device = torch.device(memory.device)
    stored = checkpoint_dtype(facts.model_config)
    dtype = resolve_dtype(config.dtype, device, stored)
    itemsize = dtype.itemsize
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    checkpoint_itemsize = stored.itemsize if isinstance(stored, torch.dtype) else None
    text_config = getattr(facts.model_config, "text_config", None) or facts.model_config
    weights = facts.weights.bytes_as(
        itemsize, checkpoint_itemsize, tied=bool(getattr(text_config, "tie_word_embeddings", False))
    )
    dtype_name = str(dtype).removeprefix("torch.")
    vision = facts.weights.vision_bytes_as(itemsize)
    try:
        context = context_length(facts.model_config, facts.tokenizer, config.max_model_len)
    except ModelLoadError:
        context = None
    shape = kv_cache_shape(facts.model_config, itemsize)
    kv = shape.bytes_for(context) if shape is not None and context else None
    values = dict(
        device=memory.device,
        dtype=dtype_name,
        weights_bytes=weights,
        vision_weights_bytes=vision,
        kv_cache_bytes=kv,
        context_tokens=context,
        available_bytes=memory.available,
        available_source=memory.source,
        other_devices=memory.others,
    )
    where = f"{memory.device} has {human_bytes(memory.available)} free ({memory.source})"
    if weights > memory.available and not facts.weights.exact:
        return warning(
            name,
            f"the weights may need {human_bytes(weights)} in {dtype_name} but "
            f"{where} (PyTorch pickles: sized by their files, an estimate)",
            "convert the checkpoint to safetensors for an exact figure, or use a "
            "device with more memory",
            **values,
        )
    if weights > memory.available:
        fixes = ["use a device with more memory, or a smaller (or quantized) checkpoint"]
        if device.type == "cuda":
            fixes.append("free what other processes hold (nvidia-smi)")
            roomier = [d for d, free in memory.others.items() if free > weights]
            if roomier:
                fixes.append(f"--device {roomier[0]}, which has room")
        elif itemsize == 4 and checkpoint_itemsize == 2 and weights // 2 <= memory.available:
            fixes.append("--dtype bfloat16 (half the memory; slower on most CPUs)")
        return failed(
            name,
            f"the weights need {human_bytes(weights)} in {dtype_name} but {where}",
            "; or ".join(fixes),
            **values,
        )
    summary = f"weights {human_bytes(weights)} in {dtype_name}"
    if vision:
        summary += f" (the vision tower's {human_bytes(vision)} included)"
    if ram is not None and weights > ram[0]:
        # from_pretrained builds the model in host memory before it moves to the GPU.
        return warning(
            name,
            f"{summary} fit {memory.device}, but the load goes through RAM, "
            f"which has {human_bytes(ram[0])} free ({ram[1]})",
            "free RAM or raise the job's memory limit (--mem under Slurm)",
            **values,
        )
    if kv is None:
        return ok(
            name, f"{summary}; {where}; no KV-cache estimate for this attention layout", **values
        )
    summary += f" + KV cache of one full context ({context} tokens) {human_bytes(kv)}"
    if weights + kv > memory.available:
        # Leave a tenth of the room: free memory moves, and the suggestion must still hold.
        fits = int((memory.available - weights) * ROOM_SHARE) // shape.bytes_per_token
        fits = fits // 256 * 256 if fits >= 256 else fits
        return warning(
            name,
            f"{summary}, but {where}: a request using the whole context would be refused",
            f"--max-model-len {fits} (90 % of what is free beside the weights)"
            if fits > 0
            else "a device with more memory",
            fitting_tokens=fits,
            **values,
        )
    return ok(name, f"{summary}; {where}", **values)
