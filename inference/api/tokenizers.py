"""Copies of the model's tokenizer for the API, so that one long prompt holds up nobody.

A fast tokenizer is not safe to share between threads, and a prompt of megabytes takes seconds
to tokenize: behind a single tokenizer every request would wait for it. The pool holds a few
copies, each used by one worker thread at a time, and keeps one of them from long prompts:
however many long prompts arrive, a short one finds a tokenizer at once.

The copies are made once, by the model's loader thread before the service is ready
(``make_copies``, from ``service.py``): deep-copying a fast tokenizer holds the GIL, and so the
event loop, for a third of a second with a vocabulary of 150,000 tokens; made on demand, the
first requests would pay for it, and everyone else with them. A tokenizer goes back to the
pool when its thread is done with it, not when the request that asked stops waiting (a client
gone, a deadline passed): a thread may still be using it then.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

POOL_SIZE = 3  # tokenizers; long prompts may hold all but one
LONG_PROMPT_CHARS = 65_536  # a prompt this long takes tens of milliseconds or more


def make_copies(tokenizer: Any, size: int = POOL_SIZE) -> tuple[Any, ...]:
    """The pool's tokenizers, copied from the loaded model's (in the loader thread)."""
    return tuple(copy.deepcopy(tokenizer) for _ in range(size))


class TokenizerPool:
    """Used from the event loop; the work runs in the pool's own threads, one per tokenizer."""

    def __init__(self, long_chars: int = LONG_PROMPT_CHARS):
        self.long_chars = long_chars
        self._executor: ThreadPoolExecutor | None = None
        self._copies: Sequence[Any] = ()  # the tokenizers handed in; their set changes on reload
        self._free: list[Any] = []
        self._long = 0  # tokenizers held by long prompts
        self._waiters: list[asyncio.Future] = []

    async def run(self, copies: Sequence[Any], chars: int, work: Callable[[Any], T]) -> T:
        """``work(tokenizer)`` in a worker thread, with one of ``copies`` (``make_copies``:
        at least two, one kept for short prompts); ``chars``, the prompt's length in
        characters, tells a long prompt from a short one."""
        if len(copies) < 2:
            raise ValueError(
                "the pool needs two tokenizers at least: one is kept for short prompts"
            )
        long = chars >= self.long_chars
        loop = asyncio.get_running_loop()
        if copies is not self._copies:
            self._copies, self._free = copies, list(copies)
            if self._executor is None:
                self._executor = ThreadPoolExecutor(len(copies), thread_name_prefix="tokenize")
        while not self._may_take(long):
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
        tokenizer = self._free.pop()
        self._long += long
        owner = self._copies

        def done(_: Future) -> None:  # in the worker thread (or here, if it never ran)
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to return
                loop.call_soon_threadsafe(self._give_back, tokenizer, long, owner)

        assert self._executor is not None
        future = self._executor.submit(work, tokenizer)
        future.add_done_callback(done)
        return await asyncio.wrap_future(future)

    def _may_take(self, long: bool) -> bool:
        if long and self._long >= len(self._copies) - 1:
            return False
        return bool(self._free)

    def _give_back(self, tokenizer: Any, long: bool, owner: Sequence[Any]) -> None:
        self._long -= long
        if owner is self._copies:
            self._free.append(tokenizer)
        for waiter in self._waiters:  # each checks again whether it may take one
            if not waiter.done():
                waiter.set_result(None)
