"""The embedded default model: a tiny Llama built locally, no download.

It is a real transformers architecture (LlamaForCausalLM) saved with ``save_pretrained`` and
loaded back through the same ``from_pretrained`` path as any checkpoint, so everything the server
does with it (chat template, KV cache, batching, sampling) is what it does with a real model.

The tokenizer is byte-level with no merges: every byte is a token, so it accepts any text. The
weights are random but seeded, so the model's output is the same on every machine; the output
rows of unprintable bytes and of the end-of-sequence token are zeroed and the others sharpened,
so that it writes printable ASCII and, in practice, runs to ``max_tokens`` (tests end
generations with stop strings).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

# Bump when the recipe changes: a cached copy of an older recipe is then rebuilt.
RECIPE_VERSION = 2
EOS_TOKEN = "<|endoftext|>"  # noqa: S105 - a token, not a password
PAD_TOKEN = "<|pad|>"  # noqa: S105 - a token, not a password
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (what ByteLevel uses)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {byte: chr(code) for byte, code in zip(printable, codes, strict=True)}


def build_byte_tokenizer(chat_template: str = CHAT_TEMPLATE, special_tokens: tuple[str, ...] = ()):
    """A byte-level tokenizer (token id == byte value), then EOS, PAD and ``special_tokens``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = _bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}  # token id == byte value
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, model_max_length=2048
    )
    if special_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    tokenizer.chat_template = chat_template
    return tokenizer


def printable_head(head) -> None:
    """Zero the output rows of unprintable bytes and special tokens and sharpen the others, so
    that the random model writes printable ASCII (in place, under no_grad)."""
    import torch

    printable = torch.zeros(head.shape[0], dtype=torch.bool)
    printable[0x20:0x7F] = True
    printable[ord("\n")] = True
    head[~printable] = 0.0
    # Sharpen the printable rows: their logits then dwarf the zeros of the others, so that
    # sampling at temperature 1 also writes printable text.
    head[printable] *= 25.0


def seeded_printable_model(model_class, config, seed: int, eos_id, pad_id: int):
    """``model_class(config)`` with weights drawn from ``seed`` (the caller's random state left
    as it was), its output head made to write printable text, and its generation config."""
    import torch
    from transformers import GenerationConfig

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = model_class(config).eval()
    finally:
        torch.random.set_rng_state(generator_state)
    with torch.no_grad():
        printable_head(model.lm_head.weight)
    model.generation_config = GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id)
    return model


def _build_model(vocab_size: int, eos_id: int, pad_id: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    return seeded_printable_model(LlamaForCausalLM, config, 20261122, eos_id, pad_id)


def demo_model_path(cache_root: str | os.PathLike) -> Path:
    return Path(cache_root) / f"demo-llama-v{RECIPE_VERSION}"


def ensure_demo_model(cache_root: str | os.PathLike) -> Path:
    """Return the directory of the demo checkpoint, building it there first if it is missing."""
    return build_once(demo_model_path(cache_root), RECIPE_VERSION, _save_demo)


def _save_demo(staging: Path) -> None:
    tokenizer = build_byte_tokenizer()
    model = _build_model(len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)


def build_once(target: Path, recipe_version: int, save: Callable[[Path], None]) -> Path:
    """Build a checkpoint with ``save(directory)`` into ``target`` unless it is there already.

    The build writes into a temporary sibling and renames it into place, so that two processes
    starting together, or a build killed half-way, never leave a partial checkpoint behind.
    """
    if (target / "build.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-build-", dir=target.parent))
    try:
        save(staging)
        (staging / "build.json").write_text(json.dumps({"recipe_version": recipe_version}))
        try:
            staging.rename(target)
        except OSError:
            if not (target / "build.json").is_file():  # not another process winning the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
