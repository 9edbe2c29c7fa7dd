"""DingTalk custom robot (自定义机器人) webhook: text messages, signed when the robot's security
setting is 加签 (a secret starting with SEC).

Signing, as DingTalk's custom robot security settings page documents it
(https://open.dingtalk.com/document/robots/customize-robot-security-settings; its text is
reproduced at https://apifox.com/apidoc/docs-site/467052/doc-3550006): the string to sign is
timestamp + "\\n" + secret, timestamp being the current time in milliseconds (at most an hour
from DingTalk's clock); HmacSHA256 keyed with the secret over that string, Base64, then
URL-encoded; both are appended to the webhook URL as &timestamp=...&sign=....

Size: DingTalk refuses a larger message with errcode 460101 "message too long, exceed 20000
bytes" (its error-code table: "body 大小不合法 ... 请保持大小在 20000bytes 以内"; seen in
timonwong/prometheus-webhook-dingtalk#30 and ZhuLinsen/daily_stock_analysis#61): the whole
request body is kept within 20,000 bytes.

The answer is HTTP 200 with {"errcode": 0, "errmsg": "ok"} on success; any other errcode (310000
for a bad signature, keyword or IP, 410100 when sending too fast: 20 messages a minute per robot)
is a failure and is retried.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import requests

from . import Relay, RelayError


def sign(secret: str, timestamp_ms: int) -> str:
    """The signature DingTalk checks (Base64; URL-encoding is left to the query string)."""
    string_to_sign = f"{timestamp_ms}\n{secret}".encode()
    digest = hmac.new(secret.encode("utf-8"), string_to_sign, hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def signed_url(webhook: str, secret: str, timestamp_ms: int) -> str:
    parts = urlsplit(webhook)
    extra = urlencode({"timestamp": timestamp_ms, "sign": sign(secret, timestamp_ms)})
    query = f"{parts.query}&{extra}" if parts.query else extra
    return urlunsplit(parts._replace(query=query))


class DingTalk(Relay):
    name = "dingtalk"
    max_body_bytes = 20_000
    limit_name = "DingTalk's 20000-byte message limit"

    def body(self, text: str) -> dict[str, Any]:
        return {"msgtype": "text", "text": {"content": text}}

    def request(self, text: str) -> tuple[str, dict[str, Any]]:
        url = self.webhook
        if self.secret:
            url = signed_url(self.webhook, self.secret, int(time.time() * 1000))
        return url, self.body(text)

    def check(self, response: requests.Response) -> None:
        answer = self.answer_json(response)
        if answer.get("errcode") != 0:
            raise RelayError(
                self.redact(
                    f"DingTalk refused the message: errcode {answer.get('errcode')!r}, "
                    f"errmsg {answer.get('errmsg')!r}"
                )
            )
