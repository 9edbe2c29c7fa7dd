"""Vision overhead: an image chat request through the real server against bare ``model.generate``,
and what image requests cost the text requests running beside them.

What it measures
    (a) The time of one image chat request through the real server (``python -m inference
        --model demo-vl`` as a subprocess, non-streaming ``POST /v1/chat/completions``, one
        request at a time) against bare ``model.generate`` on the same model in this process,
        with the same processor outputs. Reported as bare time / server time, i.e. the server's
        throughput relative to bare, once with the client-side wall time and once with the
        server's own ``duration_s`` (its per-request JSON log line, matched by X-Request-Id).
        Goal: >= 0.9.
    (b) Text tokens/s of text chat requests at concurrency ``--text-concurrency`` alone, against
        the same text load while ``--image-threads`` client threads send image requests
        continuously beside it; the ratio (beside / alone, no goal) and the image requests'
        throughput beside the text load.

How
    The image is a phone screenshot drawn with Pillow (``--image-size``, default 1080x2400:
    status bar, app bar, search box, a banner with a gradient, list rows with avatars and text,
    bottom navigation), saved as PNG and sent as a ``data:image/png;base64,...`` URL in an
    ``image_url`` part followed by a text part. The server's time covers all its work on the
    request: reading the JSON body, base64 and PNG decoding, the chat template, the processor
    (resize to ``--max-image-pixels``, patches), the vision tower, the prefill and the decode.

    The baseline model is loaded here (``inference.model.loader.load_model(Config(model=
    "demo-vl", ...))``, with ``set_max_pixels`` applied to its processor as the server applies
    ``--max-image-pixels``) before the server starts. Its inputs are made once, as the server
    makes them: the same request body read by ``read_messages``, the image decoded by
    ``load_image``, the prompt from ``template_prompt`` (the chat template) and
    ``processor(text=[prompt], images=[image], return_tensors="pt")``; the bare timing covers
    ``model.generate(**inputs, do_sample=False, min_new_tokens=N, max_new_tokens=N)`` only,
    under ``torch.inference_mode``. The bare runs happen only while the server is idle.

    Every request is greedy with ``ignore_eos`` (``"temperature": 0, "ignore_eos": true``), so
    each generates exactly its ``max_tokens``: the answers' ``usage.completion_tokens`` and the
    bare outputs' lengths are checked, and so is the image requests' ``usage.prompt_tokens``
    against the bare prompt's length (the same image tokens on both sides); a mismatch fails
    the run. Text requests use the prompts of bench/_benchutil.py as one user message each.
    The client (``requests``, one keep-alive session per client thread, opened during warm-up)
    runs in this process; request bodies are serialized once.

    The server is started as in bench/serving_efficiency.py (its ``Server``: a free port in
    18100-18199, JSON log lines into a file, ``GET /ready`` polled, always terminated at the
    end), with ``--model demo-vl --max-image-pixels PIXELS``. After warm-up (uncounted),
    ``--repeats`` rounds each run four modes back to back, the order reversed every other
    round: ``bare`` (``--image-requests`` generate calls), ``image`` (as many image requests
    through the server, one at a time), ``text`` (``--text-concurrency`` threads each sending
    ``--text-requests`` text requests of ``--text-max-tokens`` tokens in sequence) and
    ``mixed`` (the same text load while ``--image-threads`` threads send image requests of
    ``--mixed-image-tokens`` tokens one after another until the text load ends; their
    throughput is over the span of the image requests). Each round gives one ratio of each
    kind. The CPU other processes take during each round is read from /proc
    (bench/_benchutil.py); a round in which they used more than ``--quiet-cores`` cores is
    left out when enough rounds are quiet.

    The defaults: ``--max-image-pixels`` 200704 (28*28*256) makes the 1080x2400 screenshot 230
    image tokens (demo-vl's own budget, half that, makes it about a hundred; AutoGLM-Phone-9B
    sees about eight hundred). ``--max-tokens`` 1024: the demo model decodes a token in well
    under a millisecond on a CPU, where a 9B model takes tens of milliseconds on a GPU, so the
    fixed cost of an image (decoding, processor, tower: tens of milliseconds) is weighed against
    a decode about as long as a real model's short answer; a smaller ``--max-tokens`` makes that
    fixed cost, which the bare timing leaves out by design, weigh more.

    Printed: each round's figures and outside load; the medians over the rounds kept of the
    per-request times; where the server's time goes for the one-at-a-time image requests (the
    log line's ``ttft_s`` split into ``preprocess_s``: PNG decoding, template and processor;
    ``queue_s``: from then until the engine takes it; ``vision_encode_s``; and the rest: the
    body, base64 decoding, any wait for the preprocessing slot, the prefill and the first
    token; then the decode, ``duration_s`` minus ``ttft_s``), beside the bare model's
    first-token time and the in-process cost of the preparation the bare timing leaves out;
    the text and image throughputs; and the final ratios: medians of the per-round ratios with
    bootstrap 95% confidence intervals.
    Nothing asserts on time; the exit status is 0 whether or not the goal is met (non-zero only
    if the server or a request fails, or a token count is wrong).

Run from the repository root (about 2 minutes with the defaults on 2 quiet CPU cores; many
times longer while other PyTorch processes share them: a request can then pass the server's
deadline, which fails the run):
    .venv/bin/python bench/vision_overhead.py [--max-tokens 1024 --repeats 12 ...]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _benchutil, serving_efficiency

from _benchutil import PROMPTS, CpuMeter, median_ci  # noqa: E402
from serving_efficiency import (  # noqa: E402
    add_server_options,
    check_server_options,
    median,
    server_records,
    start_server,
)

GOAL_BARE_VS_SERVER = 0.9
IMAGE_QUESTION = "What is on this screen? Describe the next action to take."
MODES = ("bare", "image", "text", "mixed")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=1024,
        help="tokens generated by each image request of (a), server and bare (default: 1024)",
    )
    parser.add_argument(
        "--image-requests",
        type=int,
        default=2,
        help="image requests sent one at a time, and bare generate calls, per round (default: 2)",
    )
    parser.add_argument(
        "--image-size",
        default="1080x2400",
        help="WIDTHxHEIGHT of the screenshot sent (default: %(default)s)",
    )
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=200_704,
        help="--max-image-pixels of the server, applied to the baseline's processor too "
        "(default: %(default)s = 28*28*256, at most 256 image tokens)",
    )
    parser.add_argument(
        "--text-concurrency",
        type=int,
        default=4,
        help="client threads sending text requests in (b) (default: 4)",
    )
    parser.add_argument(
        "--text-requests",
        type=int,
        default=4,
        help="text requests each text thread sends in sequence, per mode and round (default: 4)",
    )
    parser.add_argument(
        "--text-max-tokens",
        type=int,
        default=512,
        help="tokens generated by each text request (default: 512)",
    )
    parser.add_argument(
        "--image-threads",
        type=int,
        default=1,
        help="client threads sending image requests beside the text load in (b) (default: 1)",
    )
    parser.add_argument(
        "--mixed-image-tokens",
        type=int,
        default=32,
        help="tokens generated by each image request beside the text load: few, so that the "
        "images' preprocessing, vision tower and prefill dominate (default: 32)",
    )
    parser.add_argument(
        "--repeats", type=int, default=12, help="measured rounds of the four modes (default: 12)"
    )
    add_server_options(parser)
    args = parser.parse_args(argv)
    for name in (
        "max_tokens",
        "image_requests",
        "max_image_pixels",
        "text_concurrency",
        "text_requests",
        "text_max_tokens",
        "image_threads",
        "mixed_image_tokens",
        "repeats",
    ):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    try:
        width, height = (int(v) for v in args.image_size.lower().split("x"))
    except ValueError:
        parser.error("--image-size must be WIDTHxHEIGHT, e.g. 1080x2400")
    if not (16 <= width <= 8000 and 16 <= height <= 8000):
        parser.error("--image-size: each side must be 16-8000 pixels")
    args.width, args.height = width, height
    check_server_options(parser, args)
    return args


# ---- the image ---------------------------------------------------------------------------------

_WORDS = (
    "meeting tomorrow photos sent you a the and dinner at seven ok thanks see update order "
    "delivered package call me back weekend plans new message from team project review draft "
    "ready lunch link shared invoice payment received reminder flight gate changed"
)


def screenshot_png(width: int, height: int, seed: int = 20261129) -> bytes:
    """A phone screenshot of a messaging app, drawn with Pillow, as PNG bytes (deterministic)."""
    from PIL import Image, ImageDraw, ImageFont

    rng = random.Random(seed)
    words = _WORDS.split()
    scale = width / 1080
    fonts: dict[int, Any] = {}

    def font(size: int):
        size = max(8, round(size * scale))
        if size not in fonts:
            try:
                fonts[size] = ImageFont.load_default(size=size)
            except (TypeError, OSError):  # Pillow without FreeType: the bitmap font
                fonts[size] = ImageFont.load_default()
        return fonts[size]

    def px(value: float) -> int:
        return round(value * scale)

    white, dark, grey = (255, 255, 255), (32, 33, 36), (117, 117, 117)
    image = Image.new("RGB", (width, height), (246, 246, 248))
    draw = ImageDraw.Draw(image)
    # Status bar: clock, signal bars, wifi, battery.
    draw.rectangle((0, 0, width, px(84)), fill=dark)
    draw.text((px(40), px(20)), "12:34", font=font(40), fill=white)
    for i in range(4):
        x = width - px(380) + i * px(22)
        draw.rectangle((x, px(56) - i * px(10), x + px(14), px(60)), fill=white)
    draw.pieslice((width - px(280), px(18), width - px(220), px(78)), 225, 315, fill=white)  # wifi
    draw.rectangle((width - px(120), px(26), width - px(48), px(58)), outline=white, width=px(3))
    draw.rectangle((width - px(114), px(32), width - px(70), px(52)), fill=white)
    draw.text((width - px(190), px(24)), "87%", font=font(26), fill=white)
    # App bar with a title and two action icons.
    draw.rectangle((0, px(84), width, px(250)), fill=(25, 118, 210))
    draw.text((px(48), px(130)), "Messages", font=font(60), fill=white)
    for i in range(2):
        x = width - px(110) - i * px(100)
        draw.ellipse((x, px(135), x + px(56), px(191)), outline=white, width=px(5))
    # Search box.
    draw.rounded_rectangle(
        (px(32), px(280), width - px(32), px(380)), radius=px(50), fill=(232, 234, 237)
    )
    draw.text((px(100), px(310)), "Search conversations", font=font(38), fill=grey)
    # A banner: a gradient sky, a sun and hills (a picture in the feed).
    top, bottom = px(410), px(820)
    for y in range(top, bottom):
        t = (y - top) / max(1, bottom - top)
        draw.line(
            (px(32), y, width - px(32), y),
            fill=(int(90 + 140 * t), int(150 + 80 * t), int(230 - 40 * t)),
        )
    draw.ellipse((width - px(300), px(460), width - px(170), px(590)), fill=(255, 210, 80))
    draw.polygon([(px(32), bottom), (px(320), px(600)), (px(600), bottom)], fill=(60, 130, 70))
    draw.polygon(
        [(px(380), bottom), (px(720), px(640)), (width - px(32), bottom)], fill=(40, 100, 55)
    )
    draw.text((px(64), px(440)), "Weekend trip: 24 photos", font=font(44), fill=white)
    # Conversation rows, down to the navigation bar.
    nav_top = height - px(200)
    y = px(850)
    row = px(190)
    while y + row <= nav_top - px(20):
        color = tuple(rng.randrange(40, 220) for _ in range(3))
        draw.ellipse((px(40), y + px(30), px(160), y + px(150)), fill=color)
        initial = chr(ord("A") + rng.randrange(26))
        draw.text((px(82), y + px(62)), initial, font=font(52), fill=white)
        name = " ".join(w.capitalize() for w in rng.sample(words, 2))
        draw.text((px(190), y + px(36)), name, font=font(44), fill=dark)
        preview = " ".join(rng.choice(words) for _ in range(rng.randrange(4, 7)))
        draw.text((px(190), y + px(100)), preview, font=font(34), fill=grey)
        draw.text(
            (width - px(170), y + px(40)),
            f"{rng.randrange(1, 13)}:{rng.randrange(60):02d} PM",
            font=font(30),
            fill=grey,
        )
        if rng.random() < 0.35:
            draw.ellipse(
                (width - px(110), y + px(100), width - px(60), y + px(150)), fill=(25, 118, 210)
            )
            draw.text(
                (width - px(96), y + px(106)), str(rng.randrange(1, 9)), font=font(30), fill=white
            )
        draw.line((px(190), y + row - 1, width, y + row - 1), fill=(220, 220, 224), width=px(2))
        y += row
    # Floating action button.
    draw.ellipse(
        (width - px(200), nav_top - px(190), width - px(50), nav_top - px(40)),
        fill=(25, 118, 210),
    )
    draw.text((width - px(147), nav_top - px(158)), "+", font=font(80), fill=white)
    # Bottom navigation: four icons with labels.
    draw.rectangle((0, nav_top, width, height), fill=white)
    draw.line((0, nav_top, width, nav_top), fill=(210, 210, 214), width=px(2))
    for i, label in enumerate(("Chats", "Calls", "People", "Settings")):
        cx = round((i + 0.5) * width / 4)
        fill = (25, 118, 210) if i == 0 else grey
        draw.rounded_rectangle(
            (cx - px(32), nav_top + px(36), cx + px(32), nav_top + px(100)),
            radius=px(14),
            fill=fill,
        )
        draw.text((cx - px(45), nav_top + px(116)), label, font=font(30), fill=fill)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


# ---- requests ----------------------------------------------------------------------------------


def image_body(data_url: str, max_tokens: int) -> bytes:
    """The JSON body of an image chat request (serialized once: the image is large)."""
    return json.dumps(
        {
            "model": "demo-vl",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": data_url}},
                        {"type": "text", "text": IMAGE_QUESTION},
                    ],
                }
            ],
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
        }
    ).encode()


def text_body(prompt: str, max_tokens: int) -> bytes:
    return json.dumps(
        {
            "model": "demo-vl",
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
        }
    ).encode()


def send(session, url: str, body: bytes, max_tokens: int, prompt_tokens: int | None = None):
    """One chat completion; (tokens generated, X-Request-Id, client-side seconds)."""
    started = time.perf_counter()
    response = session.post(
        url + "/v1/chat/completions",
        data=body,
        headers={"Content-Type": "application/json"},
        timeout=300,
    )
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code}: {response.text[:500]}")
    usage = response.json()["usage"]
    seconds = time.perf_counter() - started
    if usage["completion_tokens"] != max_tokens:
        raise RuntimeError(
            f"the server generated {usage['completion_tokens']} tokens, not {max_tokens}"
        )
    if prompt_tokens is not None and usage["prompt_tokens"] != prompt_tokens:
        raise RuntimeError(
            f"the server's prompt has {usage['prompt_tokens']} tokens, the bare one "
            f"{prompt_tokens}: not the same processor outputs"
        )
    return usage["completion_tokens"], response.headers.get("x-request-id", ""), seconds


class Clients:
    """Keep-alive sessions, one per client thread, kept for the whole run."""

    def __init__(self, url: str, args, image_url: str, prompt_tokens: int):
        import requests

        self.url = url
        self.args = args
        self.prompt_tokens = prompt_tokens
        self.image_c1_body = image_body(image_url, args.max_tokens)
        self.image_mixed_body = image_body(image_url, args.mixed_image_tokens)
        self.text_bodies = [text_body(p, args.text_max_tokens) for p in PROMPTS]
        self.c1 = requests.Session()
        self.text = [requests.Session() for _ in range(args.text_concurrency)]
        self.image = [requests.Session() for _ in range(args.image_threads)]
        self.executor = ThreadPoolExecutor(max_workers=args.text_concurrency + args.image_threads)

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        for session in [self.c1, *self.text, *self.image]:
            session.close()

    def images_one_at_a_time(self, count: int) -> list[tuple[str, float]]:
        """``count`` image requests in sequence; (request id, client-side seconds) of each."""
        out = []
        for _ in range(count):
            _, request_id, seconds = send(
                self.c1, self.url, self.image_c1_body, self.args.max_tokens, self.prompt_tokens
            )
            out.append((request_id, seconds))
        return out

    def text_load(self, offset: int, per_thread: int | None = None) -> tuple[int, float]:
        """Every text thread sends its requests in sequence; (tokens, wall seconds)."""
        per_thread = per_thread or self.args.text_requests
        threads = self.args.text_concurrency

        def worker(index: int) -> int:
            tokens = 0
            for j in range(per_thread):
                body = self.text_bodies[(offset + index * per_thread + j) % len(self.text_bodies)]
                tokens += send(self.text[index], self.url, body, self.args.text_max_tokens)[0]
            return tokens

        started = time.perf_counter()
        tokens = sum(self.executor.map(worker, range(threads)))
        return tokens, time.perf_counter() - started

    def mixed(self, offset: int, per_thread: int | None = None) -> dict[str, Any]:
        """The text load while the image threads send image requests until it ends."""
        stop = threading.Event()
        spans: list[tuple[float, float, str]] = []  # (start, end, request id) per image request
        lock = threading.Lock()

        def image_worker(index: int) -> None:
            while not stop.is_set():
                started = time.perf_counter()
                _, request_id, _ = send(
                    self.image[index],
                    self.url,
                    self.image_mixed_body,
                    self.args.mixed_image_tokens,
                    self.prompt_tokens,
                )
                with lock:
                    spans.append((started, time.perf_counter(), request_id))

        futures = [self.executor.submit(image_worker, i) for i in range(self.args.image_threads)]
        try:
            text_tokens, text_seconds = self.text_load(offset, per_thread)
        finally:
            stop.set()
            for future in futures:
                future.result()  # the requests under way finish; an error is raised here
        span = max(e for _, e, _ in spans) - min(s for s, _, _ in spans) if spans else 0.0
        return {
            "text_tokens": text_tokens,
            "text_seconds": text_seconds,
            "images": len(spans),
            "image_seconds": span,
            "image_ids": [request_id for _, _, request_id in spans],
        }


# ---- the baseline ------------------------------------------------------------------------------


def baseline_inputs(loaded, image_url: str):
    """The processor's outputs for the image request, made as the server makes them."""
    from inference.api.schemas import ChatCompletionRequest
    from inference.vision.content import read_messages
    from inference.vision.images import ImageLimits, load_image
    from inference.vision.preprocess import template_prompt

    parsed = ChatCompletionRequest.model_validate(json.loads(image_body(image_url, 1)))
    content = read_messages(parsed.messages, loaded.name, loaded.accepts_images)
    decoded = [load_image(part.url, ImageLimits()) for part in content.images]
    prompt = template_prompt(loaded.processor, content.messages)
    inputs = loaded.processor(text=[prompt], images=[d.image for d in decoded], return_tensors="pt")
    return inputs.to(loaded.device)


def preprocess_seconds(loaded, image_url: str) -> float:
    """What the bare timing leaves out: base64 and PNG decoding, template and processor."""
    started = time.perf_counter()
    baseline_inputs(loaded, image_url)
    return time.perf_counter() - started


def bare_generate(loaded, inputs, max_tokens: int) -> float:
    """One ``model.generate`` on the prepared inputs; seconds (the token count checked)."""
    import torch

    cuda = loaded.device.type == "cuda"
    with torch.inference_mode():
        if cuda:
            torch.cuda.synchronize(loaded.device)
        started = time.perf_counter()
        out = loaded.model.generate(
            **inputs, do_sample=False, min_new_tokens=max_tokens, max_new_tokens=max_tokens
        )
        if cuda:
            torch.cuda.synchronize(loaded.device)
        seconds = time.perf_counter() - started
    generated = out.shape[1] - inputs["input_ids"].shape[1]
    if generated != max_tokens:
        raise RuntimeError(f"bare generate made {generated} tokens, not {max_tokens}")
    return seconds


# ---- the server's log --------------------------------------------------------------------------


def own_seconds(records: dict[str, dict[str, Any]], ids: list[str]) -> float | None:
    """The summed duration_s of these requests; None if a log line is missing."""
    if not ids or any(r not in records for r in ids):
        return None
    return sum(float(records[r]["duration_s"]) for r in ids)


def wait_for_records(log_path: Path, ids: list[str], timeout: float = 2.0) -> dict:
    """The log's records once those of ``ids`` are there (or after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        records = server_records(log_path)
        if all(r in records for r in ids) or time.monotonic() >= deadline:
            return records
        time.sleep(0.05)


# ---- figures -----------------------------------------------------------------------------------


def _ci(values: list[float], digits: int = 3) -> str:
    low, high = median_ci(values)
    return f"{low:.{digits}f}-{high:.{digits}f}"


def _field_medians(records: dict, ids: list[str]) -> dict[str, float]:
    """Medians of the log line's timings over these requests (seconds)."""
    rows = [records[r] for r in ids if r in records]
    out = {}
    for key in ("duration_s", "preprocess_s", "queue_s", "vision_encode_s", "ttft_s"):
        values = [float(row[key]) for row in rows if key in row]
        out[key] = median(values)
    parts = ("preprocess_s", "queue_s", "vision_encode_s")
    out["rest"] = median(
        [float(r["ttft_s"]) - sum(float(r.get(k, 0)) for k in parts) for r in rows if "ttft_s" in r]
    )
    out["decode"] = median(
        [float(r["duration_s"]) - float(r["ttft_s"]) for r in rows if "ttft_s" in r]
    )
    out["image_tokens"] = median([float(r["image_tokens"]) for r in rows if "image_tokens" in r])
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from inference.config import Config
    from inference.model.loader import load_model, resized_pixels, set_max_pixels

    began = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="vigil-bench-vision-"))
    png = screenshot_png(args.width, args.height)
    image_url = "data:image/png;base64," + base64.b64encode(png).decode("ascii")

    # The baseline, before the server starts (the two never load or run at once).
    loaded = load_model(Config(model="demo-vl", demo_dir=args.demo_dir))
    set_max_pixels(loaded.processor.image_processor, args.max_image_pixels)
    inputs = baseline_inputs(loaded, image_url)
    prompt_tokens = int(inputs["input_ids"].shape[1])
    grid = [int(v) for v in inputs["image_grid_thw"][0].tolist()]
    resized = resized_pixels(loaded.processor.image_processor, args.width, args.height)
    print(
        f"vision_overhead: demo-vl on {loaded.device} ({loaded.dtype_name}), torch "
        f"{torch.__version__}, {torch.get_num_threads()} torch threads here, "
        f"{os.cpu_count()} CPUs"
    )
    print(
        f"  image: {args.width}x{args.height} PNG screenshot, {len(png) / 1024:.0f} KiB "
        f"({len(image_url) / 1024:.0f} KiB as a data URL); --max-image-pixels "
        f"{args.max_image_pixels}: resized to {resized} pixels, grid t,h,w = {grid}, "
        f"{prompt_tokens} prompt tokens"
    )
    print(
        f"  {args.repeats} rounds of: bare generate x {args.image_requests} and image requests "
        f"x {args.image_requests} one at a time ({args.max_tokens} tokens each); text c="
        f"{args.text_concurrency} x {args.text_requests} request(s) per thread "
        f"({args.text_max_tokens} tokens) alone, and beside {args.image_threads} thread(s) of "
        f"image requests ({args.mixed_image_tokens} tokens); greedy, ignore_eos"
    )
    # Warm-up and the bare reference figures, before the server exists.
    for _ in range(2):
        bare_generate(loaded, inputs, args.max_tokens)
    bare_first = median([bare_generate(loaded, inputs, 1) for _ in range(5)])
    bare_pre = median([preprocess_seconds(loaded, image_url) for _ in range(5)])

    args.server_arg = [
        "--model",
        "demo-vl",  # after Server's own --model demo: the last one wins
        "--max-image-pixels",
        str(args.max_image_pixels),
        *args.server_arg,
    ]
    server = None
    clients = None
    meter = CpuMeter(lambda: [server.process.pid] if server is not None else [])
    rounds: list[dict[str, Any]] = []
    status = 0
    try:
        server = start_server(args, workdir)
        print(
            f"  server: {' '.join(server.command[1:])}"
            + (f" (log: {server.log_path})" if args.keep else "")
        )
        clients = Clients(server.url, args, image_url, prompt_tokens)
        clients.images_one_at_a_time(2)  # warm-up (uncounted), and opens every connection
        clients.text_load(0, per_thread=1)
        clients.mixed(0, per_thread=1)
        for index in range(args.repeats):
            order = list(MODES) if index % 2 == 0 else list(reversed(MODES))
            run: dict[str, Any] = {"order": order}
            load = 0.0
            round_began = time.monotonic()
            for mode in order:
                mark = meter.mark()
                if mode == "bare":  # the server is idle now: nothing in flight
                    run["bare"] = [
                        bare_generate(loaded, inputs, args.max_tokens)
                        for _ in range(args.image_requests)
                    ]
                elif mode == "image":
                    run["image"] = clients.images_one_at_a_time(args.image_requests)
                elif mode == "text":
                    run["text"] = clients.text_load(index)
                else:
                    run["mixed"] = clients.mixed(index)
                load = max(load, meter.foreign_cores(mark))
            run["load"] = load
            run["seconds"] = time.monotonic() - round_began
            rounds.append(run)
            ids = [r for r, _ in run["image"]]
            records = wait_for_records(server.log_path, ids)
            print_round(index, run, records, args)
    except Exception as exc:  # noqa: BLE001 - say what failed, with the server's last lines
        print(f"vision_overhead: FAILED: {exc}", file=sys.stderr)
        if server is not None:
            print(f"server log tail:\n{server.log_tail()}", file=sys.stderr)
        status = 1
    finally:
        if clients is not None:
            clients.close()
        records = {}
        if server is not None:
            server.stop()
            with contextlib.suppress(OSError):
                records = server_records(server.log_path)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if status:
        return status
    summarize(rounds, records, args, bare_first, bare_pre)
    print(f"(the whole run took {time.monotonic() - began:.0f} s)")
    return 0


def round_figures(run: dict[str, Any], records: dict) -> dict[str, float | None]:
    bare = sum(run["bare"])
    client = sum(seconds for _, seconds in run["image"])
    own = own_seconds(records, [r for r, _ in run["image"]])
    text_tokens, text_seconds = run["text"]
    mixed = run["mixed"]
    alone = text_tokens / text_seconds
    beside = mixed["text_tokens"] / mixed["text_seconds"]
    return {
        "bare": bare / len(run["bare"]),
        "client": client / len(run["image"]),
        "own": own / len(run["image"]) if own is not None else None,
        "ratio_client": bare / client,
        "ratio_own": bare / own if own else None,
        "alone": alone,
        "beside": beside,
        "ratio_text": beside / alone,
        "image_rate": mixed["images"] / mixed["image_seconds"] if mixed["image_seconds"] else 0.0,
        "images": mixed["images"],
    }


def print_round(index: int, run: dict[str, Any], records: dict, args) -> None:
    f = round_figures(run, records)
    own = (
        f"server's own {f['own']:.3f} s, ratio {f['ratio_own']:.3f}"
        if f["own"] is not None
        else "server's own n/a"
    )
    print(
        f"  round {index + 1:2d} ({'>'.join(run['order'])}): (a) bare {f['bare']:.3f} s, "
        f"client {f['client']:.3f} s per request, ratio {f['ratio_client']:.3f}; {own}"
    )
    print(
        f"           (b) text c={args.text_concurrency} alone {f['alone']:6.1f} tok/s, beside "
        f"images {f['beside']:6.1f} tok/s, ratio {f['ratio_text']:.3f}; images beside "
        f"{f['images']} at {f['image_rate']:.2f} req/s; other load {run['load']:.2f} cores; "
        f"{run['seconds']:.1f} s"
    )


def summarize(rounds, records, args, bare_first: float, bare_pre: float) -> None:
    quiet = [i for i, run in enumerate(rounds) if run["load"] <= args.quiet_cores]
    use_quiet = len(quiet) >= max(3, len(rounds) // 4)
    chosen = quiet if use_quiet else list(range(len(rounds)))
    print(
        f"other processes used more than {args.quiet_cores:g} cores during "
        f"{len(rounds) - len(quiet)} of {len(rounds)} rounds; figures below are over "
        + (
            f"the {len(quiet)} quiet rounds"
            if use_quiet
            else "all rounds (too few quiet)"
            if len(quiet) < len(rounds)
            else "all rounds"
        )
    )
    figures = [round_figures(rounds[i], records) for i in chosen]
    bare_times = [s for i in chosen for s in rounds[i]["bare"]]
    client_times = [s for i in chosen for _, s in rounds[i]["image"]]
    c1_ids = [r for i in chosen for r, _ in rounds[i]["image"]]
    mixed_ids = [r for i in chosen for r in rounds[i]["mixed"]["image_ids"]]
    gaps = [
        seconds - float(records[r]["duration_s"])
        for i in chosen
        for r, seconds in rounds[i]["image"]
        if r in records
    ]
    c1 = _field_medians(records, c1_ids)
    n = args.max_tokens
    print(f"(a) one image request at a time, {n} tokens, medians per request:")
    print(
        f"  bare model.generate (processor outputs ready): {median(bare_times):.3f} s; its "
        f"first token (vision tower + prefill): {bare_first * 1e3:.1f} ms, then "
        f"{(median(bare_times) - bare_first) / max(1, n - 1) * 1e3:.2f} ms per token"
    )
    print(
        f"  server, client-side: {median(client_times):.3f} s; server's own duration_s: "
        f"{c1['duration_s']:.3f} s; client-side minus duration_s (HTTP, JSON, client): "
        f"{median(gaps) * 1e3:.1f} ms"
    )
    print(
        f"  where the server's time goes: ttft_s {c1['ttft_s'] * 1e3:.1f} ms = preprocess_s "
        f"{c1['preprocess_s'] * 1e3:.1f} ms (PNG decode, template, processor) + queue_s "
        f"{c1['queue_s'] * 1e3:.1f} ms + vision_encode_s {c1['vision_encode_s'] * 1e3:.1f} ms "
        f"+ the rest {c1['rest'] * 1e3:.1f} ms (body, base64, prefill, first token); then "
        f"decode "
        f"{c1['decode']:.3f} s ({c1['decode'] / max(1, n - 1) * 1e3:.2f} ms per token); "
        f"{c1['image_tokens']:.0f} image tokens; all of the bare run's preparation "
        f"in-process (body, base64, PNG, template, processor), left out of its timing: "
        f"{bare_pre * 1e3:.1f} ms"
    )
    alone = [f["alone"] for f in figures]
    beside = [f["beside"] for f in figures]
    rates = [f["image_rate"] for f in figures]
    mixed = _field_medians(records, mixed_ids)
    print(
        f"(b) text c={args.text_concurrency} ({args.text_max_tokens} tokens per request), "
        f"medians over rounds: alone {median(alone):.1f} tok/s (95% CI {_ci(alone, 1)}), "
        f"beside {args.image_threads} image thread(s) {median(beside):.1f} tok/s "
        f"(95% CI {_ci(beside, 1)})"
    )
    print(
        f"  image requests beside the text ({args.mixed_image_tokens} tokens): "
        f"{median(rates):.2f} req/s (95% CI {_ci(rates, 2)}), "
        f"{median(rates) * args.mixed_image_tokens:.1f} tok/s; "
        f"{len(mixed_ids)} requests, median duration_s {mixed['duration_s']:.3f} s, "
        f"preprocess_s {mixed['preprocess_s'] * 1e3:.1f} ms, vision_encode_s "
        f"{mixed['vision_encode_s'] * 1e3:.1f} ms, queue_s {mixed['queue_s'] * 1e3:.1f} ms, "
        f"ttft_s {mixed['ttft_s'] * 1e3:.1f} ms"
    )
    ratio_client = [f["ratio_client"] for f in figures]
    ratio_own = [f["ratio_own"] for f in figures if f["ratio_own"] is not None]
    ratio_text = [f["ratio_text"] for f in figures]
    for label, values in (("client-side", ratio_client), ("server's own duration_s", ratio_own)):
        if not values:
            print(f"RATIO (a) bare / server, {label}: n/a (no log lines)")
            continue
        value = median(values)
        print(
            f"RATIO (a) bare generate / server image request, {label} (median of "
            f"{len(values)} rounds, 95% CI {_ci(values)}): {value:.3f}  goal >= "
            f"{GOAL_BARE_VS_SERVER}  ({'met' if value >= GOAL_BARE_VS_SERVER else 'NOT met'})"
        )
    print(
        f"RATIO (b) text tokens/s beside image requests / alone (median of {len(ratio_text)} "
        f"rounds, 95% CI {_ci(ratio_text)}): {median(ratio_text):.3f}  (no goal)"
    )


if __name__ == "__main__":
    sys.exit(main())
