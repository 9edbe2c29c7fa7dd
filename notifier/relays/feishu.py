"""Feishu/Lark custom bot (自定义机器人) webhook: text messages, signed when the bot's security
setting is 签名校验 (signature verification).

Signing, as Feishu's custom bot guide documents it
(https://open.feishu.cn/document/client-docs/bot-v3/add-custom-bot, "签名校验"): the string to
sign is timestamp + "\\n" + secret, timestamp being the current time in seconds (at most an hour
from Feishu's clock); HmacSHA256 computed with that string as the KEY over an empty message (the
guide's Go, Java and Python samples: hmac.new(string_to_sign.encode("utf-8"),
digestmod=hashlib.sha256)), then Base64. Unlike DingTalk, the timestamp and the signature travel
in the JSON body, as "timestamp" and "sign".

Size: the guide's troubleshooting for code 9499 "Bad Request" says the request body must not
exceed 20 K ("请求体大小不能超过20k"): the whole body is kept within 20,000 bytes.

The answer is {"code": 0, "msg": "success", "data": {}} on success (older deployments also say
"StatusCode": 0); any other code (19021 for a bad signature or a timestamp out of the hour, 19024
for a missing keyword, 9499 for a bad request, 11232 when sending too fast) is a failure and is
retried.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from typing import Any

import requests

from . import Relay, RelayError


def sign(secret: str, timestamp_s: int) -> str:
    """The signature Feishu checks: HMAC-SHA256 keyed by timestamp + "\\n" + secret over an
    empty message, Base64."""
    key = f"{timestamp_s}\n{secret}".encode()
    return base64.b64encode(hmac.new(key, b"", hashlib.sha256).digest()).decode("ascii")


class Feishu(Relay):
    name = "feishu"
    max_body_bytes = 20_000
    limit_name = "Feishu's 20 KB request limit"
    credential_in_path = True  # .../bot/v2/hook/<hook id>

    def body(self, text: str) -> dict[str, Any]:
        return {"msg_type": "text", "content": {"text": text}}

    def request(self, text: str) -> tuple[str, dict[str, Any]]:
        body = self.body(text)
        if self.secret:
            timestamp = int(time.time())
            body = {"timestamp": str(timestamp), "sign": sign(self.secret, timestamp), **body}
        return self.webhook, body

    def check(self, response: requests.Response) -> None:
        answer = self.answer_json(response)
        code = answer.get("code", answer.get("StatusCode"))
        if code != 0:
            raise RelayError(
                self.redact(
                    f"Feishu refused the message: code {code!r}, msg "
                    f"{answer.get('msg', answer.get('StatusMessage'))!r}"
                )
            )
