"""inference.vision.images: image URLs of chat messages to RGB images, with real Pillow images and
a real HTTP server on 127.0.0.1; every bad input gets its ImageError code, nothing by timing."""

from __future__ import annotations

import base64
import gzip
import io
import random
import socket
import struct
import subprocess
import sys
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image, ImageFile

from inference.vision.images import (
    DecodedImage,
    ImageError,
    ImageLimits,
    describe_url,
    load_image,
)

LIMITS = ImageLimits()
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def noise(size: int = 64) -> Image.Image:
    """Random pixels: they do not compress, so a cut file loses most of its image data."""
    return Image.frombytes("RGB", (size, size), random.Random(size).randbytes(size * size * 3))


def load(data: bytes, limits: ImageLimits = LIMITS) -> DecodedImage:
    return load_image(data_url(data), limits)


def refused(url: str, code: str, limits: ImageLimits = LIMITS) -> str:
    with pytest.raises(ImageError) as info:
        load_image(url, limits)
    assert info.value.code == code, info.value.message
    assert str(info.value) == info.value.message
    return info.value.message


def close_to(pixel, expected, tolerance: int = 8) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected, strict=True))


# Formats and modes


@pytest.mark.parametrize(
    ("fmt", "params", "exact"),
    [("PNG", {}, True), ("JPEG", {"quality": 95}, False), ("WEBP", {"lossless": True}, True)],
)
def test_png_jpeg_and_webp_decode_to_rgb(fmt, params, exact):
    image = Image.new("RGB", (40, 30), RED)
    image.paste(BLUE, (20, 0, 40, 30))
    decoded = load(encode(image, fmt, **params))
    assert (decoded.format, decoded.width, decoded.height, decoded.source) == (fmt, 40, 30, "data")
    assert decoded.image.mode == "RGB" and decoded.image.size == (40, 30)
    assert decoded.encoded_bytes == len(encode(image, fmt, **params))
    left, right = decoded.image.getpixel((5, 15)), decoded.image.getpixel((35, 15))
    if exact:
        assert (left, right) == (RED, BLUE)
    else:
        assert close_to(left, RED) and close_to(right, BLUE), (left, right)


def test_an_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), BLUE)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    decoded = load(data)
    assert decoded.format == "GIF" and decoded.image.mode == "RGB"
    assert decoded.image.getpixel((8, 8)) == RED


def test_an_animated_webp_gives_its_first_frame():
    frames = [Image.new("RGB", (16, 16), GREEN), Image.new("RGB", (16, 16), BLUE)]
    data = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    decoded = load(data)
    assert decoded.format == "WEBP" and decoded.image.getpixel((8, 8)) == GREEN
    assert decoded.image.mode == "RGB"


def test_rgba_is_composited_over_white():
    image = Image.new("RGBA", (3, 1), (0, 0, 0, 0))  # fully transparent black
    image.putpixel((1, 0), (255, 0, 0, 255))
    image.putpixel((2, 0), (255, 0, 0, 128))  # half transparent red
    pixels = load(encode(image, "PNG")).image
    assert pixels.mode == "RGB"
    assert pixels.getpixel((0, 0)) == WHITE
    assert pixels.getpixel((1, 0)) == RED
    assert close_to(pixels.getpixel((2, 0)), (255, 127, 127), 2)


def test_a_palette_png_with_a_transparent_index_gets_white_there():
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, *GREEN])  # index 0 black (transparent), 1 green
    image.putpixel((1, 0), 1)
    data = encode(image, "PNG", transparency=0)
    assert Image.open(io.BytesIO(data)).mode == "P"
    pixels = load(data).image
    assert pixels.getpixel((0, 0)) == WHITE and pixels.getpixel((1, 0)) == GREEN


def test_grey_modes_become_rgb():
    assert load(encode(Image.new("L", (4, 4), 77), "PNG")).image.getpixel((0, 0)) == (77,) * 3
    grey_alpha = load(encode(Image.new("LA", (4, 4), (0, 0)), "PNG")).image
    assert grey_alpha.getpixel((0, 0)) == WHITE
    one_bit = load(encode(Image.new("1", (4, 4), 1), "PNG")).image
    assert one_bit.mode == "RGB" and one_bit.getpixel((0, 0)) == WHITE
    # 16 bits: scaled to 8 (40000 / 256), not clipped to white as Pillow's convert would.
    deep = load(encode(Image.new("I;16", (4, 4), 40000), "PNG")).image
    assert deep.getpixel((0, 0)) == (156,) * 3


def test_a_cmyk_jpeg_becomes_rgb():
    decoded = load(encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95))
    assert decoded.image.mode == "RGB" and close_to(decoded.image.getpixel((4, 4)), RED)


# Data URLs


def test_whitespace_and_newlines_in_the_payload_are_ignored():
    payload = base64.encodebytes(encode(noise(32), "PNG")).decode()  # wrapped at 76, with \n
    assert "\n" in payload
    url = "data:image/png;base64,  " + payload.replace("\n", "\r\n\t ")
    assert load_image(url, LIMITS).image.size == (32, 32)


def test_the_declared_mime_type_is_not_trusted():
    decoded = load_image(data_url(encode(noise(8), "PNG"), "image/jpeg"), LIMITS)
    assert decoded.format == "PNG"
    assert load_image(data_url(encode(noise(8), "PNG"), ""), LIMITS).format == "PNG"


@pytest.mark.parametrize(
    "url",
    [
        "data:image/png;base64,iVBORw0KGgo$$$",  # not the base64 alphabet
        "data:image/png;base64,iVBORw0KGgoAA",  # missing padding
        "data:image/png;base64,iVBO-_w0KGgo=",  # url-safe alphabet
        "data:image/png;base64,iVBORw0KGgo\u00e9",  # not ASCII
    ],
)
def test_bad_base64(url):
    assert "invalid base64" in refused(url, "invalid_base64")


@pytest.mark.parametrize(
    "url",
    ["data:image/png,rawbytes", "data:image/png;charset=utf-8,x", "data:image/png;base64"],
)
def test_data_urls_that_are_not_base64_or_malformed(url):
    refused(url, "invalid_image_url")


def test_an_empty_payload():
    assert "empty" in refused("data:image/png;base64,", "invalid_image")


@pytest.mark.parametrize(
    "data",
    [
        random.Random(0).randbytes(2000),
        b"hello, this is a text file\n" * 20,
        b"<html><body>Not Found</body></html>",
    ],
    ids=["random", "text", "html"],
)
def test_bytes_that_are_no_image(data):
    message = refused(data_url(data), "invalid_image")
    assert "not a PNG, JPEG, WebP or GIF image" in message


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "PPM", "ICO"])
def test_formats_we_do_not_accept(fmt):
    data = encode(Image.new("RGB", (8, 8), RED), fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # a real image, that Pillow could read
    assert "not a PNG, JPEG, WebP or GIF" in refused(data_url(data), "invalid_image")


@pytest.mark.parametrize(("fmt", "name"), [("PNG", "PNG"), ("JPEG", "JPEG"), ("GIF", "GIF")])
def test_a_file_cut_in_half_is_truncated(fmt, name):
    data = encode(noise(), fmt)
    message = refused(data_url(data[: len(data) // 2]), "invalid_image")
    assert message.startswith(f"truncated or corrupt {name} image: ")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_a_data_url_over_max_bytes():
    data = encode(noise(32), "PNG")
    limits = ImageLimits(max_bytes=len(data) - 1)
    message = refused(data_url(data), "image_too_large", limits)
    assert f"{len(data)} bytes" in message and f"limit of {len(data) - 1} bytes" in message
    assert load(data, ImageLimits(max_bytes=len(data))).encoded_bytes == len(data)
    # Refused before any decoding, from the length alone (here, a payload that is not base64).
    refused("data:image/png;base64," + "!" * 10_000, "image_too_large", ImageLimits(max_bytes=100))


@pytest.mark.parametrize(
    ("url", "scheme"),
    [
        ("file:///etc/passwd", "'file'"),
        ("ftp://example.com/x.png", "'ftp'"),
        ("FILE:///etc/passwd", "'file'"),
        ("", "no scheme"),
        ("/tmp/x.png", "no scheme"),
        ("iVBORw0KGgoAAAANSUhEUgAA", "no scheme"),  # raw base64, no data: prefix
        ("http://", "no host"),
    ],
)
def test_unsupported_urls(url, scheme):
    message = refused(url, "invalid_image_url")
    assert scheme in message
    if scheme != "no host":
        assert "data:" in message and "http(s):" in message


# Decompression bombs: small files whose header declares a huge image


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_declaring(width: int, height: int, idat: bytes | None = None) -> bytes:
    """A small real PNG whose IHDR is rewritten to declare width x height (CRC fixed)."""
    data = encode(Image.new("L", (16, 16), 200), "PNG")
    assert data[12:16] == b"IHDR"
    ihdr = struct.pack(">II", width, height) + data[24:29]  # depth, colour type, ...: kept
    rest = data[33:]
    if idat is not None:  # replace the image data
        rest = _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    return data[:8] + _chunk(b"IHDR", ihdr) + rest


def test_a_header_over_our_limit_is_refused_with_its_declared_size(monkeypatch):
    def no_decoding(self, *args, **kwargs):
        pytest.fail("the pixels were decoded before the size check")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    data = png_declaring(8000, 8000)  # 64 M pixels: over our 50 M, under Pillow's own limit
    assert len(data) < 200
    message = refused(data_url(data), "image_too_large")
    assert "8000x8000" in message and "64000000 pixels" in message and "50000000" in message


def test_the_size_is_checked_before_the_garbage_pixels_are():
    data = png_declaring(100, 100, idat=b"garbage, no zlib stream")
    assert "100x100" in refused(
        data_url(data), "image_too_large", ImageLimits(max_header_pixels=9999)
    )
    # The same bytes within the limit: decoded, and found corrupt.
    refused(data_url(data), "invalid_image", ImageLimits(max_header_pixels=10_000))


def test_pillows_own_bomb_error_becomes_image_too_large():
    max_pixels = Image.MAX_IMAGE_PIXELS
    data = png_declaring(30000, 30000)  # 900 M pixels: Pillow refuses it in Image.open already
    message = refused(data_url(data), "image_too_large")
    assert "900000000 pixels" in message
    huge = ImageLimits(max_header_pixels=10**12)  # a laxer limit of ours does not lift Pillow's
    refused(data_url(data), "image_too_large", huge)
    assert max_pixels == Image.MAX_IMAGE_PIXELS


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
def test_pillows_bomb_warning_raised_as_an_error_becomes_image_too_large():
    # 100 M pixels: past Image.MAX_IMAGE_PIXELS (a warning), under twice it (Pillow's error).
    assert Image.MAX_IMAGE_PIXELS < 10_000 * 10_000 < 2 * Image.MAX_IMAGE_PIXELS
    data = data_url(png_declaring(10_000, 10_000))
    refused(data, "image_too_large", ImageLimits(max_header_pixels=10**12))


def test_limits_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        ImageLimits(max_bytes=0)


# describe_url


def test_describe_url_never_shows_a_payload_query_or_password():
    payload = base64.b64encode(encode(noise(16), "PNG")).decode()
    shown = describe_url(f"data:image/png;base64,{payload}")
    assert shown == f"data:image/png;base64 ({len(payload)} chars)"
    assert payload[:12] not in shown and payload[-12:] not in shown
    assert describe_url("data:image/png;base64" + payload).startswith("data: URL without a comma")
    shown = describe_url("https://user:secret@Host.example:8443/a/b.png?token=abc#frag")
    assert shown == "https://Host.example:8443/a/b.png"
    assert describe_url("file:///etc/passwd") == "file: URL (18 chars)"
    assert describe_url("") == "empty URL"
    assert describe_url(payload) == f"URL without a scheme ({len(payload)} chars)"
    assert "\n" not in describe_url("http://host/a\nb")


# http(s) from a server on 127.0.0.1


PNG = encode(noise(24), "PNG")


class Handler(BaseHTTPRequestHandler):
    stop: threading.Event  # set by the fixture: ends the trickle

    def log_message(self, format, *args):  # noqa: A002 (BaseHTTPRequestHandler's name)
        pass

    def _send(self, status: int, body: bytes, length: bool = True, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", headers.pop("content_type", "image/png"))
        for name, value in headers.items():
            self.send_header(name, value)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 (BaseHTTPRequestHandler's name)
        path = self.path.partition("?")[0]
        if path == "/img.png":
            self._send(200, PNG)
        elif path == "/redirect":
            self._send(302, b"", Location="/img.png")
        elif path.startswith("/hops/"):  # /hops/N: N redirects before the image
            hops = int(path.rpartition("/")[2])
            self._send(302, b"", Location=f"/hops/{hops - 1}" if hops > 1 else "/img.png")
        elif path == "/gzip":  # 100 bytes on the wire, 50 kB once decompressed
            self._send(200, gzip.compress(b"\0" * 50_000), **{"Content-Encoding": "gzip"})
        elif path == "/big":
            self._send(200, PNG + b"\0" * 5000)
        elif path == "/big-unannounced":  # no Content-Length: HTTP/1.0, ends at close
            self._send(200, PNG + b"\0" * 5000, length=False)
        elif path == "/html":
            self._send(200, b"<html>login page</html>", content_type="text/html")
        elif path == "/trickle":
            self.send_response(200)
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.flush()
            for byte in PNG:  # a byte every 50 ms: over a minute; the deadline is 0.5 s
                if self.stop.wait(0.05):
                    return
                try:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                except OSError:  # the client gave up
                    return
        else:
            self._send(404, b"not here", content_type="text/plain")


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    """requests honours proxy variables: the server on 127.0.0.1 is reached directly."""
    for name in ("http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture(scope="module")
def server():
    stop = threading.Event()
    handler = type("TestHandler", (Handler,), {"stop": stop})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    stop.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


def test_an_http_png(server):
    decoded = load_image(f"{server}/img.png?sig=1", LIMITS)
    assert (decoded.source, decoded.format, decoded.encoded_bytes) == ("http", "PNG", len(PNG))
    assert decoded.image.tobytes() == noise(24).tobytes()


def test_a_redirect_is_followed(server):
    assert load_image(f"{server}/redirect", LIMITS).source == "http"


def test_three_redirects_are_followed_and_a_fourth_is_not(server):
    assert load_image(f"{server}/hops/3", LIMITS).encoded_bytes == len(PNG)
    message = refused(f"{server}/hops/4", "image_fetch_failed")
    assert message == f"could not fetch image {server}/hops/4: more than 3 redirects"


def test_404_names_the_url_without_its_query(server):
    message = refused(f"{server}/missing.png?token=secret", "image_fetch_failed")
    assert message == f"could not fetch image {server}/missing.png: HTTP 404"


@pytest.mark.parametrize("path", ["/big", "/big-unannounced"])
def test_a_body_over_max_bytes(server, path):
    message = refused(f"{server}{path}", "image_too_large", ImageLimits(max_bytes=len(PNG) + 100))
    assert f"{server}{path}" in message


def test_a_compressed_body_is_counted_decompressed(server):
    message = refused(f"{server}/gzip", "image_too_large", ImageLimits(max_bytes=20_000))
    assert "more than 20000 bytes" in message


def test_a_web_page_is_not_an_image(server):
    message = refused(f"{server}/html", "invalid_image")
    assert "text/html" in message and "not a PNG" in message


def test_a_slow_body_runs_into_the_deadline(server):
    limits = ImageLimits(fetch_timeout_s=0.5)
    message = refused(f"{server}/trickle", "image_fetch_failed", limits)
    assert "timed out" in message and "0.5 s" in message and f"{server}/trickle" in message


def test_a_closed_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # free once closed: nothing listens there
    message = refused(f"http://127.0.0.1:{port}/x.png?k=v", "image_fetch_failed")
    assert message == f"could not fetch image http://127.0.0.1:{port}/x.png: connection refused"


def test_a_redirect_to_another_scheme_is_not_followed(server, monkeypatch):
    monkeypatch.setattr(Handler, "do_GET", _redirect_to_file)
    message = refused(f"{server}/anything", "image_fetch_failed")
    assert "redirected to a file: URL" in message


def _redirect_to_file(self):
    self._send(302, b"", Location="file:///etc/passwd")


def test_the_module_needs_no_torch_transformers_starlette_or_pydantic():
    blocked = ("torch", "transformers", "starlette", "pydantic", "fastapi")
    code = (
        "import sys\n"
        f"for name in {blocked!r}: sys.modules[name] = None\n"
        "import inference.vision.images\n"
        f"assert not [n for n in sys.modules if n.split('.')[0] in {blocked!r} "
        "and sys.modules[n] is not None]\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
