"""Chat relays: where the notifier forwards each notification besides printing it. Each relay
signs its requests as its tool documents, keeps each message within the tool's documented size
limit, and counts a request as sent only when the tool's answer says so (both tools answer HTTP
200 with an error code in the JSON body when they refuse a message)."""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import urlsplit

import requests


class RelayError(Exception):
    """One attempt that failed; the message says what the tool answered (never the secret)."""


class Relay:
    """A chat tool's custom robot behind a signed webhook."""

    name = ""
    # The largest request body the tool takes, in bytes (UTF-8 JSON).
    max_body_bytes = 0
    limit_name = ""  # how the limit is named in the note of alerts left out

    def __init__(self, webhook: str, secret: str | None = None):
        self.webhook = webhook
        self.secret = secret

    def body(self, text: str) -> dict[str, Any]:
        """The unsigned request body carrying ``text``."""
        raise NotImplementedError

    def request(self, text: str) -> tuple[str, dict[str, Any]]:
        """The URL and the body of a request sending ``text`` now (signed when there is a
        secret: signatures carry the time, so each attempt is signed afresh)."""
        raise NotImplementedError

    def check(self, response: requests.Response) -> None:
        """RelayError unless the tool's answer says the message was taken."""
        raise NotImplementedError

    def fits(self, text: str) -> bool:
        """Whether a request carrying ``text`` stays within the tool's size limit."""
        _, body = self.request(text)
        return len(encode(body)) <= self.max_body_bytes

    def send(self, text: str, session: requests.Session, timeout: float) -> None:
        url, body = self.request(text)
        try:
            response = session.post(
                url,
                data=encode(body),
                headers={"Content-Type": "application/json; charset=utf-8"},
                timeout=timeout,
            )
        except requests.RequestException as exc:
            reason = _redact(str(exc), self.webhook)
            raise RelayError(f"request failed: {type(exc).__name__}: {reason}") from None
        self.check(response)

    def __str__(self) -> str:
        return self.name


def encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def answer_json(response: requests.Response) -> dict[str, Any]:
    """The JSON object of a 2xx answer; RelayError for any other status or body."""
    snippet = response.text[:300]
    if not 200 <= response.status_code < 300:
        raise RelayError(f"HTTP {response.status_code}: {snippet}")
    try:
        answer = response.json()
    except ValueError:
        raise RelayError(
            f"HTTP {response.status_code} with a body that is not JSON: {snippet}"
        ) from None
    if not isinstance(answer, dict):
        raise RelayError(f"HTTP {response.status_code} with an unexpected body: {snippet}")
    return answer


def _redact(text: str, webhook: str) -> str:
    """An exception's text without the webhook's path and query string, where the robots'
    credentials travel (Feishu's hook id in the path, DingTalk's access token and signature in
    the query)."""
    path = urlsplit(webhook).path
    if len(path) > 1:
        text = text.replace(path, "/...")
    return re.sub(r"\?[^\s'\")]*", "?...", text)
