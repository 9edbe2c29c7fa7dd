"""Load any causal LM that transformers can load, and describe it for the engine."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config
from .demo import ensure_demo_model

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
    """Tokens of one full context: the override, else the config's, else the tokenizer's."""
    if override:
        return override
    for attr in ("max_position_embeddings", "seq_length", "n_positions", "max_sequence_length"):
        value = getattr(model_config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
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
    if config.model == "demo":
        return str(ensure_demo_model(config.demo_dir))
    return config.model


def load_model(config: Config) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

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
    try:
        model = AutoModelForCausalLM.from_pretrained(
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
        has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
    )
