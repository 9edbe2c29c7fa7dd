"""Incremental detokenization and stop strings.

Decoding token by token breaks multi-byte characters (a byte-level token can hold half of one)
and loses the leading space of SentencePiece tokens. As vLLM and TGI do, each step decodes a
short window of recent tokens and emits only the new text, holding it back while it ends in an
incomplete character; a few prompt tokens prime the window so the first token decodes as it
would in context. Text that could be the start of a stop string is held back until it is known
not to be one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_PROMPT_CONTEXT_TOKENS = 5
_INCOMPLETE = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], stop: Sequence[str] = ()):
        self._tokenizer = tokenizer
        self._ids: list[int] = list(prompt_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stop = tuple(s for s in stop if s)
        self._holdback = max((len(s) for s in self._stop), default=1) - 1
        self.text = ""  # all text decoded so far, cut at a stop string once one is found
        self._emitted = 0  # how much of self.text has been handed out
        self.stopped = False  # a stop string was found

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    def add(self, token_id: int) -> str:
        """Add one generated token; return the text that may now be shown."""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith(_INCOMPLETE):
            new_text = full[len(prefix) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            self._append(new_text)
        return self._take(final=False)

    def _append(self, new_text: str) -> None:
        if self.stopped:
            return
        # A stop string can only start in the held-back tail or the new text.
        search_from = max(0, len(self.text) - self._holdback)
        self.text += new_text
        hits = [at for at in (self.text.find(s, search_from) for s in self._stop) if at != -1]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def _take(self, final: bool) -> str:
        end = (
            len(self.text)
            if (final or self.stopped)
            else max(self._emitted, len(self.text) - self._holdback)
        )
        out = self.text[self._emitted : end]
        self._emitted = end
        return out

    def flush(self) -> str:
        """At the end of generation: the text still held back."""
        return self._take(final=True)


def decode_output(tokenizer: Any, prompt_ids: Sequence[int], output_ids: Sequence[int]) -> str:
    """The whole output's text, decoded as IncrementalDetokenizer would (same leading space)."""
    context = list(prompt_ids[-_PROMPT_CONTEXT_TOKENS:])
    kwargs = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}
    prefix = tokenizer.decode(context, **kwargs)
    full = tokenizer.decode(context + list(output_ids), **kwargs)
    return (
        full[len(prefix) :] if full.startswith(prefix) else tokenizer.decode(output_ids, **kwargs)
    )
