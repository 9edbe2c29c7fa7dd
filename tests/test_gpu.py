"""The CUDA paths, for real: run on a GPU machine (`scripts/test -m gpu`); skipped elsewhere."""

from __future__ import annotations

import time

import openai
import pytest

pytestmark = pytest.mark.gpu


def test_demo_model_serves_on_cuda_with_allocator_metrics(server_factory):
    server = server_factory("--device", "cuda")
    client = openai.OpenAI(base_url=server.url("/v1"), api_key="x", max_retries=0, timeout=120)
    before = server.sample("inference_torch_cuda_memory_allocated_bytes")
    assert before > 0  # the weights
    response = client.completions.create(
        model="demo", prompt="gpu", max_tokens=200, temperature=0, extra_body={"ignore_eos": True}
    )
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
        return (
            client.completions.create(model="demo", prompt=prompt, max_tokens=32, temperature=0)
            .choices[0]
            .text
        )

    prompts = ["a", "a longer prompt", "zz" * 30]
    alone = [run(p) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        assert list(pool.map(run, prompts * 2)) == alone * 2


# ---- the vision-language demo model on CUDA ---------------------------------------------------


def _screenshot_url(colour: tuple[int, int, int], size: tuple[int, int]) -> str:
    import base64
    import io

    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, colour)
    draw = ImageDraw.Draw(image)
    draw.rectangle((20, 40, size[0] - 20, 120), fill=(255, 255, 255))
    draw.ellipse((size[0] // 3, size[1] // 3, size[0] // 2, size[1] // 2), fill=(0, 0, 0))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_demo_vl_batched_image_and_text_answers_match_on_cuda(server_factory):
    """Image requests (vision tower and 3-D positions on the GPU) batched with text requests
    give the same greedy answers as each alone."""
    import concurrent.futures

    server = server_factory("--device", "cuda", "--dtype", "float32", model="demo-vl")
    client = openai.OpenAI(base_url=server.url("/v1"), api_key="x", max_retries=0, timeout=120)
    images = [
        _screenshot_url((30, 120, 200), (540, 1200)),
        _screenshot_url((200, 40, 40), (1080, 2400)),
        _screenshot_url((10, 160, 60), (800, 600)),
    ]
    messages = [
        [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": f"step {i}"},
                ],
            }
        ]
        for i, url in enumerate(images)
    ] + [[{"role": "user", "content": "text only"}], [{"role": "user", "content": "more text"}]]

    def run(conversation) -> str:
        response = client.chat.completions.create(
            model="demo-vl",
            messages=conversation,
            max_tokens=32,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert response.usage.completion_tokens == 32
        return response.choices[0].message.content

    alone = [run(m) for m in messages]
    with concurrent.futures.ThreadPoolExecutor(len(messages)) as pool:
        assert list(pool.map(run, messages * 2)) == alone * 2
    assert server.sample("inference_model_info", device="cuda:0") == 1
    assert server.sample("inference_vision_encoder_duration_seconds_count") == 9
    batch_sizes = [line.get("batch_size", 0) for line in server.logs() if "images" in line]
    assert max(batch_sizes) > 1  # image requests did share the batch


def test_demo_vl_in_half_precision_on_cuda(server_factory):
    server = server_factory("--device", "cuda", model="demo-vl")  # auto: bfloat16 on CUDA
    client = openai.OpenAI(base_url=server.url("/v1"), api_key="x", max_retries=0, timeout=120)
    url = _screenshot_url((90, 90, 90), (1080, 2400))
    stream = client.chat.completions.create(
        model="demo-vl",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "what is on the screen?"},
                ],
            }
        ],
        max_tokens=64,
        temperature=0.0,
        top_p=0.85,
        frequency_penalty=0.2,
        stream=True,
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text
    assert server.sample("inference_model_info", device="cuda:0", dtype="bfloat16") == 1


# ---- out of memory and admission control on a real GPU ---------------------------------------

MIB = 2**20
# A model with a large KV cache and small weights: 32 layers x 64 KV heads x 128 x bfloat16
# = exactly 1 MiB of KV cache per token, about 0.55 GB of weights.
WIDE_KV_BYTES_PER_TOKEN = 2 * 32 * 64 * 128 * 2


@pytest.fixture(scope="session")
def wide_kv_model(tmp_path_factory, demo_dir):
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    from inference.model.demo import ensure_demo_model

    target = tmp_path_factory.mktemp("wide-kv")
    tokenizer = AutoTokenizer.from_pretrained(ensure_demo_model(demo_dir))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=32,
        num_attention_heads=64,
        num_key_value_heads=64,
        head_dim=128,
        # Longer than any GPU's memory holds at 1 MiB per token (an H200 has 139 GiB).
        max_position_embeddings=1 << 20,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(7)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    del model
    torch.cuda.empty_cache()
    return str(target)


def _wide_server(server_factory, wide_kv_model, *extra):
    return server_factory(
        "--device",
        "cuda",
        "--max-tokens-limit",
        str(1 << 20),
        "--served-model-name",
        "wide",
        "--request-timeout",
        "600",
        *extra,
        model=wide_kv_model,
    )


def _completion(server, prompt: str, max_tokens: int, deadline: float = 200):
    import requests

    return requests.post(
        server.url("/v1/completions"),
        timeout=deadline + 30,
        headers={"X-Request-Timeout": str(deadline)},
        json={
            "model": "wide",
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
        },
    )


def test_admission_refuses_a_request_whose_kv_cache_cannot_fit(server_factory, wide_kv_model):
    import torch

    server = _wide_server(server_factory, wide_kv_model)
    assert server.sample("inference_kv_cache_bytes_per_token") == WIDE_KV_BYTES_PER_TOKEN
    free, total = torch.cuda.mem_get_info()
    too_many = int(total / WIDE_KV_BYTES_PER_TOKEN) + 1000  # more KV than the whole device
    response = _completion(server, "x", too_many)
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["code"] == "insufficient_memory"
    assert (
        f"{too_many + 1} tokens" in error["message"]
        and "MiB are free on cuda:0" in error["message"]
    )
    assert "Retry-After" not in response.headers
    assert server.sample("inference_admission_refusals_total", reason="insufficient_memory") == 1
    assert _completion(server, "x", 8).status_code == 200


def test_admission_estimate_against_the_measured_memory_growth(server_factory, wide_kv_model):
    server = _wide_server(server_factory, wide_kv_model)
    prompt, max_tokens = "y" * 200, 1000
    before = server.sample("inference_torch_cuda_memory_peak_allocated_bytes")
    started = time.monotonic()
    response = _completion(server, prompt, max_tokens)
    print(f"\n{max_tokens} tokens in {time.monotonic() - started:.1f} s")
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    assert usage["completion_tokens"] == max_tokens
    after = server.sample("inference_torch_cuda_memory_peak_allocated_bytes")
    estimate = (usage["prompt_tokens"] + max_tokens) * WIDE_KV_BYTES_PER_TOKEN
    growth = after - before
    ratio = estimate / growth
    print(
        f"\nKV estimate {estimate / MIB:.0f} MiB, measured peak growth {growth / MIB:.0f} MiB, "
        f"estimate/measured = {ratio:.3f}"
    )
    # The cache grows by concatenation, so the peak holds one layer's old and new tensors at
    # once, plus the prefill's activations: the estimate is a little below the peak.
    assert 0.8 <= ratio <= 1.05


_BALLAST = """
import sys, torch
free, total = torch.cuda.mem_get_info()
held = torch.empty(free - int(sys.argv[1]), dtype=torch.uint8, device="cuda")
print("held", held.numel(), flush=True)
sys.stdin.read()
"""


def test_a_real_oom_mid_decode_is_answered_and_the_server_serves_on(server_factory, wide_kv_model):
    import concurrent.futures
    import subprocess
    import sys

    server = _wide_server(server_factory, wide_kv_model, "--on-stall", "report")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(_completion, server, f"row {i}", 12000) for i in range(4)]
        server.wait_for(
            lambda: server.sample("inference_requests_running") == 4,
            timeout=60,
            what="four running requests",
        )
        # Another process takes all but 1 GiB of the GPU: the growing KV cache runs out.
        ballast = subprocess.Popen(
            [sys.executable, "-c", _BALLAST, str(1024 * MIB)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert ballast.stdout.readline().startswith("held")
            results = [f.result(timeout=600) for f in futures]
        finally:
            ballast.stdin.close()
            ballast.wait(timeout=60)
    codes = [r.json()["error"]["code"] if r.status_code != 200 else "ok" for r in results]
    print("\nanswers under memory pressure:", codes)
    assert set(codes) <= {"ok", "out_of_memory", "insufficient_memory"}
    assert "out_of_memory" in codes
    assert server.sample("inference_out_of_memory_errors_total", stage="decode") >= 1
    oom = next(
        r for r in results if r.status_code == 503 and r.json()["error"]["code"] == "out_of_memory"
    )
    assert "MiB free of" in oom.json()["error"]["message"]
    # The memory is back: the next request is served, and no slot leaked.
    assert _completion(server, "after", 16).status_code == 200
    assert server.sample("inference_requests_in_flight") == 0
    assert server.sample("inference_requests_running") == 0
    assert requests_health(server) == 200


def requests_health(server) -> int:
    import requests

    return requests.get(server.url("/health"), timeout=5).status_code
