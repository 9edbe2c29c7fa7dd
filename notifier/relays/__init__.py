"""Chat relays: where the notifier forwards each notification besides printing it. Each relay
signs its requests as its tool documents, keeps each message within the tool's documented size
limit, and counts a request as sent only when the tool's answer says so (both tools answer HTTP
200 with an error code in the JSON body when they refuse a message).

A robot's webhook is a credential (Feishu's hook id in the path, DingTalk's access token and
signature in the query): nothing a relay says (an exception, a piece of an answer) and nothing
the HTTP client logs shows it (``Relay.redact``, ``keep_http_client_logs_quiet``)."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any
from urllib.parse import parse_qsl, quote, quote_plus, urlsplit

import requests


class RelayError(Exception):
    """One attempt that failed; the message says what the tool answered (never the secret).
    Tried again after a delay, up to the configured attempts."""


class RelayRefused(RelayError):
    """The tool refused the message in a way another attempt cannot change (its security
    settings, a request it cannot read): given up at once, with ``hint`` for the person."""

    def __init__(self, message: str, hint: str):
        super().__init__(message)
        self.hint = hint


class RelayThrottled(RelayError):
    """The tool says this robot sends too fast: waited out, spending no attempt."""


class Relay:
    """A chat tool's custom robot behind a signed webhook."""

    name = ""
    title = ""  # the tool's name in what is said ("DingTalk")
    # The largest request body the tool takes, in bytes (UTF-8 JSON).
    max_body_bytes = 0
    limit_name = ""  # how the limit is named in the note of alerts left out
    # Whether the last segment of the webhook's path is a credential (Feishu's hook id).
    credential_in_path = False
    # The answer's fields: the error code (0: taken) and its message.
    code_field = ""
    message_field = ""
    # Codes that say the robot sends too fast, and codes of refusals that no retry changes,
    # each with what a person should check.
    throttled_codes: frozenset[int] = frozenset()
    refusals: Mapping[int, str] = MappingProxyType({})
    # The tool's documented rate limit, kept on this side: at most N requests in any T
    # seconds, for each (N, T), so that a storm of alerts does not get the robot throttled.
    rate_limits: tuple[tuple[int, float], ...] = ()

    def __init__(self, webhook: str, secret: str | None = None):
        self.webhook = webhook
        self.secret = secret
        self._credentials = _credentials(webhook, secret, self.credential_in_path)

    def body(self, text: str) -> dict[str, Any]:
        """The unsigned request body carrying ``text``."""
        raise NotImplementedError

    def request(self, text: str) -> tuple[str, dict[str, Any]]:
        """The URL and the body of a request sending ``text`` now (signed when there is a
        secret: signatures carry the time, so each attempt is signed afresh)."""
        raise NotImplementedError

    def answer_code(self, answer: dict[str, Any]) -> tuple[Any, Any]:
        """The answer's error code (None: the answer has none) and message."""
        return answer.get(self.code_field), answer.get(self.message_field)

    def check(self, response: requests.Response) -> None:
        """Nothing when the tool's answer says the message was taken; else RelayThrottled,
        RelayRefused (with a hint) or RelayError, saying what it answered."""
        code, message = self.answer_code(self.answer_json(response))
        if code == 0:
            return
        said = self.redact(
            f"{self.title} refused the message: {self.code_field} {code!r}, "
            f"{self.message_field} {message!r}"
        )
        if code in self.throttled_codes:
            raise RelayThrottled(said)
        if code in self.refusals:
            raise RelayRefused(said, self.refusals[code])
        raise RelayError(said)

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
            reason = self.redact(str(exc))
            raise RelayError(f"request failed: {type(exc).__name__}: {reason}") from None
        self.check(response)

    def answer_json(self, response: requests.Response) -> dict[str, Any]:
        """The tool's JSON answer: a 2xx one, or one of another status that carries the tool's
        error code (Feishu answers a bad request with HTTP 400 and code 9499). Else
        RelayThrottled for HTTP 429 and RelayError otherwise, with the beginning of the body,
        redacted (a proxy's error page may echo the request's URL)."""
        status = response.status_code
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if isinstance(answer, dict) and self.answer_code(answer)[0] is not None:
            return answer
        snippet = self.redact(response.text[:300])
        if status == 429:
            raise RelayThrottled(f"HTTP 429: {snippet}")
        if not 200 <= status < 300:
            raise RelayError(f"HTTP {status}: {snippet}")
        if answer is None:
            raise RelayError(f"HTTP {status} with a body that is not JSON: {snippet}")
        raise RelayError(f"HTTP {status} with an unexpected body: {snippet}")

    def redact(self, text: str) -> str:
        """``text`` without this relay's credentials: the webhook's path and query, each
        credential it carries (and the secret), wherever they appear."""
        return redact(text, [self.webhook], self._credentials)

    def __str__(self) -> str:
        return self.name


def encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


# A query string, and the parameters that carry DingTalk's token and signature wherever they
# appear (a proxy's page may quote them without the "?").
_QUERY = re.compile(r"\?[^\s'\"()<>]*")
_CREDENTIAL_PARAMETER = re.compile(r"\b(access_token|sign)=[^&\s'\"()<>]*")


def _credentials(webhook: str, secret: str | None, credential_in_path: bool) -> list[str]:
    parts = urlsplit(webhook)
    found = [value for _, value in parse_qsl(parts.query) if value]
    if credential_in_path:
        found.append(parts.path.rstrip("/").rpartition("/")[2])
    if secret:
        found.append(secret)
    # Each as written and as a URL or a form would encode it; the longest first.
    # (a value under four characters would garble the text it is taken out of)
    spelled = {
        form
        for value in found
        if len(value) >= 4
        for form in (value, quote(value), quote_plus(value))
    }
    return sorted(spelled, key=len, reverse=True)


def redact(text: str, webhooks: Iterable[str], credentials: Iterable[str] = ()) -> str:
    """``text`` without the webhooks' paths and query strings and without ``credentials``."""
    for webhook in webhooks:
        path = urlsplit(webhook).path
        if len(path) > 1:
            text = text.replace(path, "/...")
    for credential in credentials:
        text = text.replace(credential, "...")
    text = _CREDENTIAL_PARAMETER.sub(r"\1=...", text)
    return _QUERY.sub("?...", text)


class _Redacting(logging.Filter):
    def __init__(self, relays: Iterable[Relay]):
        super().__init__()
        self._relays = list(relays)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        for relay in self._relays:
            message = relay.redact(message)
        record.msg, record.args = message, ()
        return True


HTTP_CLIENT_LOGGERS = ("urllib3", "requests")


def keep_http_client_logs_quiet(relays: Iterable[Relay]) -> None:
    """urllib3 logs every request line at DEBUG, query string included ("POST /robot/send?
    access_token=...&sign=..."), and the standard-library logging it uses is routed into the
    notifier's JSON log (vigil.logs): keep the HTTP client's loggers at WARNING whatever
    --log-level says, and take the relays' credentials out of anything that is still logged
    through the standard library."""
    for name in HTTP_CLIENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    redacting = _Redacting(relays)
    for handler in logging.getLogger().handlers:
        handler.addFilter(redacting)
