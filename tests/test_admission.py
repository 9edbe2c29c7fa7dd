"""The KV-cache estimate from model configurations, and admission control in the real engine
with a stand-in for the CUDA memory query (the hardware seam)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from inference.config import Config
from inference.engine.engine import Engine
from inference.engine.memory import KvCacheShape, describe_figures, kv_cache_shape
from inference.engine.queue import RequestQueue
from inference.engine.request import Failed, Finished, GenerationRequest, SamplingParams
from inference.model.loader import load_model


def test_estimate_for_grouped_query_attention():
    # Llama-3-8B: 32 layers, 8 KV heads of 128, bfloat16: 128 KiB per token.
    config = SimpleNamespace(
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, hidden_size=4096
    )
    shape = kv_cache_shape(config, 2)
    assert shape == KvCacheShape(32, 8, 128, 2)
    assert shape.bytes_per_token == 131072
    assert shape.bytes_for(1000) == 131072000


def test_estimate_for_glm_checkpoint_names():
    # ChatGLM/GLM-4 configs: num_layers, multi_query_group_num and kv_channels.
    config = SimpleNamespace(
        num_layers=40,
        num_attention_heads=32,
        multi_query_group_num=2,
        kv_channels=128,
        hidden_size=4096,
    )
    assert kv_cache_shape(config, 2) == KvCacheShape(40, 2, 128, 2)


def test_estimate_reads_the_text_config_and_an_explicit_head_dim():
    text = SimpleNamespace(
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=80,
        hidden_size=512,
    )
    assert kv_cache_shape(SimpleNamespace(text_config=text), 4) == KvCacheShape(4, 4, 80, 4)


def test_no_estimate_for_other_cache_layouts():
    mla = SimpleNamespace(
        num_hidden_layers=61, num_attention_heads=128, kv_lora_rank=512, hidden_size=7168
    )
    assert kv_cache_shape(mla, 2) is None
    assert kv_cache_shape(SimpleNamespace(), 2) is None


def test_memory_figures_are_described_in_mib():
    figures = {
        "allocated": 3 * 2**20,
        "reserved": 4 * 2**20,
        "free": 10 * 2**20,
        "total": 80 * 2**20,
    }
    assert describe_figures(figures, "cuda:0") == (
        "cuda:0: 3 MiB allocated, 4 MiB reserved by PyTorch, 10 MiB free of 80 MiB"
    )
    assert describe_figures({}, "cpu") == ""


class _DeviceMemory:
    """A device of ``capacity`` bytes whose only user is the engine's KV cache."""

    def __init__(self, capacity: int, kv: KvCacheShape):
        self.capacity = capacity
        self.kv = kv
        self.engine: Engine | None = None

    def available_bytes(self) -> int:
        held = self.engine.held_requests() if self.engine is not None else []
        return self.capacity - sum(
            self.kv.bytes_for(r.prompt_tokens + r.completion_tokens) for r in held
        )


class _Observer:
    def __init__(self):
        self.refused: list[str] = []

    def step(self, stage, batch_size):
        pass

    def running_changed(self, running):
        pass

    def batch_formed(self, new_requests):
        pass

    def out_of_memory(self, stage):
        pass

    def fault_fired(self, fault, stage):
        pass

    def admission_refused(self, reason):
        self.refused.append(reason)


@pytest.fixture(scope="module")
def loaded(demo_dir):
    return load_model(Config(demo_dir=demo_dir, device="cpu"))


def _engine(loaded, available: int):
    queue = RequestQueue(16)
    observer = _Observer()
    kv = kv_cache_shape(loaded.model.config, loaded.dtype.itemsize)
    memory = _DeviceMemory(available, kv)
    engine = Engine(loaded, queue, max_batch_size=8, observer=observer, kv_cache=kv, memory=memory)
    memory.engine = engine
    engine.start()
    return engine, queue, observer, kv


def _submit(queue, loaded, text: str, max_tokens: int):
    request = GenerationRequest(
        request_id=text,
        prompt_ids=loaded.tokenizer(text)["input_ids"],
        params=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
        stream=False,
        deadline_ns=time.perf_counter_ns() + 60 * 10**9,
    )
    done = threading.Event()
    outcome = []

    def emit(event):
        if isinstance(event, (Finished, Failed)):
            outcome.append(event)
            done.set()

    request.emit = emit
    queue.put(request)
    return request, done, outcome


def test_demo_model_estimate(loaded):
    # 4 layers, 4 KV heads of 32 (256 / 8 heads), float32.
    kv = kv_cache_shape(loaded.model.config, loaded.dtype.itemsize)
    assert kv == KvCacheShape(4, 4, 32, 4) and kv.bytes_per_token == 4096


def test_a_request_that_cannot_fit_is_refused_with_its_numbers(loaded):
    engine, queue, observer, kv = _engine(loaded, available=100 * 4096)
    try:
        request, done, outcome = _submit(queue, loaded, "too big", max_tokens=200)
        assert done.wait(30)
        [failed] = outcome
        assert isinstance(failed, Failed)
        error = failed.error
        assert error.status == 503 and error.code == "insufficient_memory"
        tokens = request.prompt_tokens + 200
        assert f"{tokens} tokens" in error.message and "4096 bytes per token" in error.message
        assert observer.refused == ["insufficient_memory"]
        assert request.scheduled_ns is None or not request.output_ids  # it never ran
        # One that fits runs.
        small, done, outcome = _submit(queue, loaded, "ok", max_tokens=10)
        assert done.wait(30) and isinstance(outcome[0], Finished)
    finally:
        engine.stop()


def test_a_request_waits_while_others_hold_the_memory(loaded):
    # Room for one request of ~300 tokens at a time: the second waits for the first to
    # finish instead of being refused, then runs.
    engine, queue, observer, kv = _engine(loaded, available=320 * 4096)
    try:
        first, first_done, first_outcome = _submit(queue, loaded, "first", max_tokens=290)
        while first.first_token_ns is None:
            time.sleep(0.01)
        second, second_done, second_outcome = _submit(queue, loaded, "second", max_tokens=290)
        assert first_done.wait(60) and second_done.wait(60)
        assert isinstance(first_outcome[0], Finished) and isinstance(second_outcome[0], Finished)
        assert second.scheduled_ns >= first.finished_ns  # it waited for the memory
        assert observer.refused == []
    finally:
        engine.stop()
