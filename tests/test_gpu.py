"""The CUDA paths, for real: run on a GPU machine (`scripts/test -m gpu`); skipped elsewhere."""

from __future__ import annotations

import openai
import pytest

pytestmark = pytest.mark.gpu


def test_demo_model_serves_on_cuda_with_allocator_metrics(server_factory):
    server = server_factory("--device", "cuda")
    client = openai.OpenAI(base_url=server.url("/v1"), api_key="x", max_retries=0, timeout=120)
    before = server.sample("inference_torch_cuda_memory_allocated_bytes")
    assert before > 0  # the weights
    response = client.completions.create(model="demo", prompt="gpu", max_tokens=200,
                                         temperature=0, extra_body={"ignore_eos": True})
    assert response.usage.completion_tokens == 200
    assert server.sample("inference_model_info", device="cuda:0") == 1
    reserved = server.sample("inference_torch_cuda_memory_reserved_bytes")
    peak = server.sample("inference_torch_cuda_memory_peak_allocated_bytes")
    assert reserved >= before and peak >= before


def test_batched_greedy_answers_match_on_cuda(server_factory):
    import concurrent.futures

    server = server_factory("--device", "cuda", "--dtype", "float32")
    client = openai.OpenAI(base_url=server.url("/v1"), api_key="x", max_retries=0, timeout=120)

    def run(prompt: str) -> str:
        return client.completions.create(model="demo", prompt=prompt, max_tokens=32,
                                         temperature=0).choices[0].text

    prompts = ["a", "a longer prompt", "zz" * 30]
    alone = [run(p) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        assert list(pool.map(run, prompts * 2)) == alone * 2
