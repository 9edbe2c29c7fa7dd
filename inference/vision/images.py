"""One image URL of a chat message (an OpenAI ``image_url`` part) to a decoded RGB image, safely.

``data:<mime>;base64,...`` URLs (what Open-AutoGLM sends: phone screenshots) and http(s) URLs are
accepted; the bytes must be a PNG, JPEG, WebP or GIF, whatever the URL declares. Every limit is
checked before the work it guards: the encoded size before decoding base64 or while downloading,
the pixel count from the header before the pixels are decoded.

Blocking (the API layer calls it in a worker thread) and light: Pillow, requests and the standard
library only; no torch, transformers, starlette or pydantic.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from io import BytesIO
from urllib.parse import urljoin, urlsplit

import requests
import urllib3.exceptions
from PIL import Image, UnidentifiedImageError

FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
MAX_REDIRECTS = 3
_REDIRECTS = (301, 302, 303, 307, 308)
_CHUNK = 65536
_WHITE = (255, 255, 255)
_ASCII_WHITESPACE = b" \t\n\r\f\v"
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
_ACCEPTED = "only data: (base64) and http(s): image URLs are accepted"
# What Pillow raises for a truncated or corrupt file, when opening or decoding it.
_CORRUPT = (OSError, SyntaxError, ValueError, EOFError)


class ImageError(ValueError):
    """A bad image: ``message`` is a sentence for an HTTP 400 body, ``code`` a short machine code:
    invalid_image_url, invalid_base64, invalid_image, image_too_large, image_fetch_failed."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass(frozen=True)
class ImageLimits:
    max_header_pixels: int = 50_000_000  # refused from the header, before decoding
    max_bytes: int = 20 * 1024 * 1024  # encoded bytes of one image (data URL payload or download)
    fetch_timeout_s: float = 10.0  # the whole http(s) download, not just the connect
    # All the images of one request together, from their headers: what decoding may cost.
    max_request_pixels: int = 100_000_000

    def __post_init__(self) -> None:
        if self.max_header_pixels <= 0 or self.max_bytes <= 0 or self.fetch_timeout_s <= 0:
            raise ValueError(f"image limits must be positive: {self}")


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # RGB, fully loaded; the first frame of an animated GIF or WebP
    format: str  # "PNG", "JPEG", "WEBP" or "GIF"
    width: int
    height: int
    encoded_bytes: int
    source: str  # "data" or "http"


@dataclass(frozen=True)
class EncodedImage:
    data: bytes  # the file as received (PNG, JPEG, ...)
    source: str  # "data" or "http"
    origin: str  # where it came from, for messages


def load_image(url: str, limits: ImageLimits) -> DecodedImage:
    """The image ``url`` names, decoded to RGB within ``limits``; ImageError says why not."""
    return decode_image(read_image_bytes(url, limits), limits)


def decode_image(encoded: EncodedImage, limits: ImageLimits) -> DecodedImage:
    """Decode an image's bytes to RGB within ``limits`` (local work: no network)."""
    return _decode(encoded.data, encoded.source, encoded.origin, limits)


def declared_size(encoded: EncodedImage) -> tuple[int, int] | None:
    """(width, height) from the image's header, decoding no pixels; None when it cannot be
    read (decode_image then says why)."""
    try:
        with Image.open(BytesIO(encoded.data), formats=list(FORMATS)) as image:
            return image.size
    except Exception:  # noqa: BLE001 - any unreadable header: decode_image explains it
        return None


def check_request_pixels(
    sizes: list[tuple[int, int] | None], limits: ImageLimits
) -> tuple[int, ImageError] | None:
    """None when the request's images declare no more pixels together than ``limits`` allow;
    else the index of the image that goes over, and the error naming the whole request's."""
    pixels = [size[0] * size[1] if size else 0 for size in sizes]  # None: unreadable, decoded later
    running = 0
    for index, count in enumerate(pixels):
        running += count
        if running > limits.max_request_pixels:
            return index, ImageError(
                f"images too large together: the request's images declare {sum(pixels)} "
                f"pixels, over the limit of {limits.max_request_pixels} pixels per request",
                "image_too_large",
            )
    return None


def read_image_bytes(url: str, limits: ImageLimits) -> EncodedImage:
    """The bytes ``url`` names: a data URL's payload, or a download (bounded by ``limits``)."""
    scheme = _scheme(url)
    if scheme == "data":
        data, source, origin = _decode_data_url(url, limits), "data", "the data URL's image"
    elif scheme in ("http", "https"):
        data, content_type = _fetch(url, limits)
        source, origin = "http", f"the image at {describe_url(url)}"
        if content_type:
            origin += f" (sent as {_printable(content_type, 60)})"
    elif scheme is None:
        raise ImageError(
            f"the image URL has no scheme: {_ACCEPTED} (raw base64 needs a "
            "data:image/png;base64, prefix)",
            "invalid_image_url",
        )
    else:
        raise ImageError(
            f"unsupported image URL scheme {scheme!r}: {_ACCEPTED}", "invalid_image_url"
        )
    return EncodedImage(data, source, origin)


def describe_url(url: str) -> str:
    """The URL for logs: never a data URL's payload, nor an http URL's query or credentials."""
    scheme = _scheme(url)
    if scheme == "data":
        header, comma, payload = url[5:].partition(",")
        if not comma:
            return f"data: URL without a comma ({len(url)} chars)"
        return f"data:{_printable(header, 60)} ({len(payload)} chars)"
    if scheme in ("http", "https"):
        try:
            parts = urlsplit(url)
        except ValueError:  # a malformed IPv6 host
            return f"malformed {scheme}: URL ({len(url)} chars)"
        host = parts.netloc.rpartition("@")[2]  # drop user:password@
        return _printable(f"{scheme}://{host}{parts.path}", 200)
    if scheme is None:
        return f"URL without a scheme ({len(url)} chars)" if url else "empty URL"
    return f"{scheme}: URL ({len(url)} chars)"


def _scheme(url: str) -> str | None:
    scheme, colon, _ = url[:40].partition(":")
    return scheme.lower() if colon and _SCHEME.fullmatch(scheme) else None


def _printable(text: str, limit: int) -> str:
    """Text from a request as one short log-safe line (no control characters)."""
    text = "".join(c if c.isprintable() else "?" for c in text[: limit + 1])
    return text if len(text) <= limit else text[:limit] + "..."


def _decode_data_url(url: str, limits: ImageLimits) -> bytes:
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise ImageError("malformed data URL: no comma before the payload", "invalid_image_url")
    if header.rpartition(";")[2].strip().lower() != "base64":
        raise ImageError(
            "only base64 data URLs are accepted (data:image/png;base64,...)", "invalid_image_url"
        )
    # Cheap before any copy: stripped of line breaks, the payload is rarely shorter by half.
    if len(payload) > 2 * _base64_length(limits.max_bytes):
        raise _too_many_bytes(f"its payload has {len(payload)} characters", limits)
    try:
        encoded = payload.encode("ascii")
    except UnicodeEncodeError:
        raise ImageError(
            "invalid base64 in the data URL: it has non-ASCII characters", "invalid_base64"
        ) from None
    encoded = encoded.translate(None, _ASCII_WHITESPACE)  # line-wrapped base64 is common
    padding = len(encoded) - len(encoded.rstrip(b"="))
    declared = len(encoded) * 3 // 4 - min(padding, 2)
    if declared > limits.max_bytes:
        raise _too_many_bytes(f"it carries {declared} bytes", limits)
    try:
        data = base64.b64decode(encoded, validate=True)
    except binascii.Error as exc:
        raise ImageError(f"invalid base64 in the data URL: {exc}", "invalid_base64") from None
    if len(data) > limits.max_bytes:
        raise _too_many_bytes(f"it carries {len(data)} bytes", limits)
    return data


def _base64_length(size: int) -> int:
    return (size + 2) // 3 * 4


def _too_many_bytes(what: str, limits: ImageLimits) -> ImageError:
    return ImageError(
        f"image too large: {what}, over the limit of {limits.max_bytes} bytes", "image_too_large"
    )


def _fetch(url: str, limits: ImageLimits) -> tuple[bytes, str]:
    """The body at ``url`` (redirects followed) and its Content-Type, within the limits."""
    shown = describe_url(url)
    try:
        host = urlsplit(url).hostname
    except ValueError as exc:
        raise ImageError(f"malformed image URL {shown}: {exc}", "invalid_image_url") from None
    if not host:
        raise ImageError(f"the image URL {shown} has no host", "invalid_image_url")
    deadline = time.monotonic() + limits.fetch_timeout_s
    session = requests.Session()
    # A no-op auth: requests would otherwise send ~/.netrc credentials to a host a client chose.
    session.auth = _no_auth
    try:
        with session:
            return _get(session, url, shown, limits, deadline)
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
        raise _fetch_failed(shown, _cause(exc, limits)) from exc


def _no_auth(request: requests.PreparedRequest) -> requests.PreparedRequest:
    return request


def _get(
    session: requests.Session, url: str, shown: str, limits: ImageLimits, deadline: float
) -> tuple[bytes, str]:
    # Redirects are followed here, not by requests: it reads a redirect's whole body, unbounded.
    for _hop in range(MAX_REDIRECTS + 1):
        remaining = _remaining(deadline, shown, limits)
        with session.get(
            url,
            stream=True,
            allow_redirects=False,
            timeout=(remaining, remaining),
            headers={"Accept": "image/*", "User-Agent": "llm-vigil"},
        ) as response:
            location = response.headers.get("Location")
            if response.status_code in _REDIRECTS and location:
                try:
                    url = urljoin(url, location)
                except ValueError:
                    raise _fetch_failed(shown, "redirected to a malformed URL") from None
                if _scheme(url) not in ("http", "https"):
                    raise _fetch_failed(shown, f"redirected to a {describe_url(url)}")
                continue
            if not 200 <= response.status_code < 300:
                raise _fetch_failed(shown, f"HTTP {response.status_code}")
            length = response.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > limits.max_bytes:
                raise _too_many_bytes(f"{shown} declares {int(length)} bytes", limits)
            body = _read_body(response, shown, limits, deadline)
            return body, response.headers.get("Content-Type", "")
    raise _fetch_failed(shown, f"more than {MAX_REDIRECTS} redirects")


def _read_body(
    response: requests.Response, shown: str, limits: ImageLimits, deadline: float
) -> bytes:
    """The body as it arrives, counted (decompressed) against max_bytes and read by the deadline.

    requests' timeout bounds each read, not the whole body a slow server drips: at the deadline a
    timer shuts the socket down (urllib3's HTTPResponse.shutdown, made for this), which ends a
    read blocked in another thread; between reads the deadline is checked as well.
    """
    raw = response.raw
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        with contextlib.suppress(AttributeError, RuntimeError, ValueError, OSError):
            raw.shutdown()  # urllib3 < 2.3 has none: the per-read timeout bounds it instead

    timer = threading.Timer(_remaining(deadline, shown, limits), expire)
    timer.daemon = True
    timer.start()
    chunks, size = [], 0
    try:
        while True:
            # read1 returns whatever has arrived (urllib3 2), decoded (gzip) as requests would.
            chunk = raw.read1(_CHUNK, decode_content=True)
            if expired.is_set() or time.monotonic() > deadline:
                raise _fetch_failed(shown, _timed_out(limits))
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > limits.max_bytes:
                raise _too_many_bytes(f"{shown} sent more than {limits.max_bytes} bytes", limits)
            chunks.append(chunk)
    except (urllib3.exceptions.HTTPError, OSError):
        if expired.is_set():  # the read the timer broke off
            raise _fetch_failed(shown, _timed_out(limits)) from None
        raise
    finally:
        timer.cancel()


def _remaining(deadline: float, shown: str, limits: ImageLimits) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _fetch_failed(shown, _timed_out(limits))
    return remaining


def _timed_out(limits: ImageLimits) -> str:
    return f"timed out (the download took longer than {limits.fetch_timeout_s:g} s)"


def _fetch_failed(shown: str, cause: str) -> ImageError:
    return ImageError(f"could not fetch image {shown}: {cause}", "image_fetch_failed")


def _cause(exc: BaseException, limits: ImageLimits) -> str:
    """Why a download failed, in a few words: requests' own messages repeat the whole URL,
    query string included, so they are never shown."""
    chain = _chain(exc)

    def has(*types: type[BaseException]) -> bool:
        return any(isinstance(e, types) for e in chain)

    if has(requests.exceptions.InvalidURL, urllib3.exceptions.LocationValueError):
        return "the URL is not valid"
    if has(socket.gaierror):
        return "the host name could not be resolved"
    if has(ConnectionRefusedError):
        return "connection refused"
    if has(requests.ConnectTimeout, urllib3.exceptions.ConnectTimeoutError):
        return f"timed out connecting (the fetch timeout is {limits.fetch_timeout_s:g} s)"
    if has(requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError):
        return _timed_out(limits)
    tls = [e for e in chain if isinstance(e, ssl.SSLError)]
    if tls:
        return f"TLS error: {_printable(str(tls[-1]), 200)}"
    if has(ConnectionResetError):
        return "connection reset by the server"
    if has(urllib3.exceptions.ProtocolError, requests.exceptions.ChunkedEncodingError):
        return "the connection broke off before the whole response arrived"
    if has(urllib3.exceptions.DecodeError, requests.exceptions.ContentDecodingError):
        return "the response's Content-Encoding could not be decoded"
    return f"connection failed ({type(chain[-1]).__name__})"


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps: causes, contexts, urllib3's ``reason`` and exception args."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo and len(seen) < 20:
        current = todo.pop(0)
        if any(current is e for e in seen):
            continue
        seen.append(current)
        linked = (getattr(current, "reason", None), current.__cause__, current.__context__)
        todo += [e for e in (*linked, *current.args) if isinstance(e, BaseException)]
    return seen


def _decode(data: bytes, source: str, origin: str, limits: ImageLimits) -> DecodedImage:
    if not data:
        raise ImageError(f"{origin} is empty", "invalid_image")
    try:
        # Pillow's own bomb check runs here too (an error past 2 x Image.MAX_IMAGE_PIXELS; left
        # as it is, as is ImageFile.LOAD_TRUNCATED_IMAGES): ours below is the stricter one.
        image = Image.open(BytesIO(data), formats=list(FORMATS))
    except UnidentifiedImageError:
        raise ImageError(
            f"{origin} is not a PNG, JPEG, WebP or GIF image", "invalid_image"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # A warning is raised only under -W error; either way the header declares too much.
        raise ImageError(f"image too large: {exc}", "image_too_large") from None
    except _CORRUPT as exc:
        raise ImageError(f"{origin} is corrupt: {exc}", "invalid_image") from None
    fmt = image.format or "?"
    width, height = image.size  # from the header: Image.open decodes no pixels
    if width * height > limits.max_header_pixels:
        raise ImageError(
            f"image too large: its header declares {width}x{height} ({width * height} pixels), "
            f"over the limit of {limits.max_header_pixels} pixels",
            "image_too_large",
        )
    try:
        image.seek(0)  # the first frame of an animation
        image.load()
        rgb = _to_rgb(image)
    except _CORRUPT as exc:
        raise ImageError(f"truncated or corrupt {fmt} image: {exc}", "invalid_image") from None
    if rgb is image and getattr(image, "is_animated", False):
        rgb = image.copy()  # an animation's frame keeps its decoder and the encoded bytes alive
        image.close()
    return DecodedImage(rgb, fmt, width, height, len(data), source)


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, transparency composited over white as vLLM does (vllm/multimodal/image.py:
    convert_image_mode and rgba_to_rgb, which turn RGBA, LA, PA and a tRNS chunk to RGBA and
    paste it over a white background with the alpha channel as the mask)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        converted = Image.new("RGB", rgba.size, _WHITE)
        converted.paste(rgba, mask=rgba.getchannel("A"))
        return converted
    if image.mode.startswith("I"):
        # 16-bit PNG grey: Pillow's convert clips to 255 (near white); scale to 8 bits instead.
        image = image.convert("I").point(lambda value: value / 256).convert("L")
    return image.convert("RGB")
