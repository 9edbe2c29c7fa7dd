"""Copies of the model's tokenizer for the API, so that one long prompt holds up nobody.

A fast tokenizer is not safe to share between threads, and a prompt of megabytes takes seconds
to tokenize: behind a single tokenizer every request would wait for it. The pool holds a few
copies, each used by one worker thread at a time, and keeps one of them from long prompts:
however many long prompts arrive, a short one finds a tokenizer at once.

Copies are made on demand, in the worker thread, from the loaded model's tokenizer, which the
pool itself never tokenizes with (the engine and the image processor have their own copies).
A tokenizer goes back to the pool when its thread is done with it, not when the request that
asked stops waiting (a client gone, a deadline passed): a thread may still be using it then.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

POOL_SIZE = 3  # tokenizers; long prompts may hold all but one
LONG_PROMPT_CHARS = 65_536  # a prompt this long takes tens of milliseconds or more


class TokenizerPool:
    """Used from the event loop; the work runs in the pool's own threads, one per tokenizer."""

    def __init__(self, size: int = POOL_SIZE, long_chars: int = LONG_PROMPT_CHARS):
        if size < 2:
            raise ValueError(
                "the pool needs two tokenizers at least: one is kept for short prompts"
            )
        self.size = size
        self.long_chars = long_chars
        self._executor = ThreadPoolExecutor(size, thread_name_prefix="tokenize")
        self._source: Any = None  # the tokenizer the copies are made from
        self._generation = 0  # bumped when the source changes: older copies are dropped
        self._free: list[Any] = []
        self._made = 0  # copies of this generation, made or being made
        self._long = 0  # tokenizers held by long prompts
        self._waiters: list[asyncio.Future] = []

    async def run(self, source: Any, chars: int, work: Callable[[Any], T]) -> T:
        """``work(tokenizer)`` in a worker thread, with a tokenizer of the pool copied from
        ``source`` (the loaded model's tokenizer); ``chars``, the prompt's length in
        characters, tells a long prompt from a short one."""
        long = chars >= self.long_chars
        loop = asyncio.get_running_loop()
        if source is not self._source:
            self._source, self._generation, self._free, self._made = (
                source,
                self._generation + 1,
                [],
                0,
            )
        while not self._may_take(long):
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
        held: list[Any] = [self._free.pop() if self._free else None]
        if held[0] is None:
            self._made += 1
        self._long += long
        generation = self._generation

        def job() -> T:
            if held[0] is None:
                held[0] = copy.deepcopy(source)
            return work(held[0])

        def done(_: Future) -> None:  # in the worker thread (or here, if it never ran)
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to return
                loop.call_soon_threadsafe(self._give_back, held[0], long, generation)

        future = self._executor.submit(job)
        future.add_done_callback(done)
        return await asyncio.wrap_future(future)

    def _may_take(self, long: bool) -> bool:
        if long and self._long >= self.size - 1:
            return False
        return bool(self._free) or self._made < self.size

    def _give_back(self, tokenizer: Any, long: bool, generation: int) -> None:
        self._long -= long
        if generation == self._generation:
            if tokenizer is None:  # the copy failed, or the job was cancelled before it ran
                self._made -= 1
            else:
                self._free.append(tokenizer)
        for waiter in self._waiters:  # each checks again whether it may take one
            if not waiter.done():
                waiter.set_result(None)
