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
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl, quote, quote_plus, urlsplit

import requests


class RelayError(Exception):
    """One attempt that failed; the message says what the tool answered (never the secret)."""


class Relay:
    """A chat tool's custom robot behind a signed webhook."""

    name = ""
    # The largest request body the tool takes, in bytes (UTF-8 JSON).
    max_body_bytes = 0
    limit_name = ""  # how the limit is named in the note of alerts left out
    # Whether the last segment of the webhook's path is a credential (Feishu's hook id).
    credential_in_path = False

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
            reason = self.redact(str(exc))
            raise RelayError(f"request failed: {type(exc).__name__}: {reason}") from None
        self.check(response)

    def answer_json(self, response: requests.Response) -> dict[str, Any]:
        """The JSON object of a 2xx answer; RelayError for any other status or body, with the
        beginning of the body, redacted (a proxy's error page may echo the request's URL)."""
        snippet = self.redact(response.text[:300])
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
