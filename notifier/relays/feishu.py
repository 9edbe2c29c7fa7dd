"""Feishu/Lark custom bot (自定义机器人) webhook: text messages, signed when the bot's security
setting is 签名校验 (signature verification).

Signing, as Feishu's custom bot guide documents it
(https://open.feishu.cn/document/client-docs/bot-v3/add-custom-bot, "签名校验"): the string to
sign is timestamp + "\\n" + secret, timestamp being the current time in seconds (at most an hour
from Feishu's clock); HmacSHA256 computed with that string as the KEY over an empty message (the
guide's Go, Java and Python samples: hmac.new(string_to_sign.encode("utf-8"),
digestmod=hashlib.sha256)), then Base64. Unlike DingTalk, the timestamp and the signature travel
in the JSON body, as "timestamp" and "sign".

Size and pace, from the same guide (自定义机器人使用指南, open.larkoffice.com/document/
ukTMukTMukTM/ucTM5YjL3ETO24yNxkjN): "请求体的数据大小不能超过 20 KB" (the whole body is kept within
20,000 bytes), and "单租户单机器人 100 次/分钟，5 次/秒", past which it answers 11232 (限流).

The answer is {"code": 0, "msg": "success", "data": {}} on success (older deployments also say
"StatusCode": 0). The guide's failures (its answers as blog.csdn.net/qq_43108153/article/details/
136166075 and blog.csdn.net/zhanglili1993/article/details/136473704 reproduce them) and what the
notifier does with them:
- 19021 "sign match fail or timestamp is not within one hour from current time", 19022 "Ip Not
  Allowed", 19024 "Key Words Not Found", 9499 "Bad Request" (a body it cannot read, or over
  20 KB): refused, given up at once with a hint;
- 11232: throttled: waited out, and paced on this side at 5 a second and 100 a minute;
- anything else: retried.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from typing import Any

from . import Relay


def sign(secret: str, timestamp_s: int) -> str:
    """The signature Feishu checks: HMAC-SHA256 keyed by timestamp + "\\n" + secret over an
    empty message, Base64."""
    key = f"{timestamp_s}\n{secret}".encode()
    return base64.b64encode(hmac.new(key, b"", hashlib.sha256).digest()).decode("ascii")


class Feishu(Relay):
    name = "feishu"
    title = "Feishu"
    max_body_bytes = 20_000
    limit_name = "Feishu's 20 KB request limit"
    credential_in_path = True  # .../bot/v2/hook/<hook id>
    code_field, message_field = "code", "msg"
    throttled_codes = frozenset({11232})
    refusals = {
        19021: "check the bot's signing secret in Feishu (签名校验; VIGIL_NOTIFIER_FEISHU_SECRET) "
        "and this machine's clock (a signature is good for an hour)",
        19022: "check the bot's IP allow-list in Feishu: this machine's public address is not on "
        "it",
        19024: "check the bot's keywords in Feishu: every message starts with [llm-vigil]: make "
        "that a keyword",
        9499: "Feishu could not read the request (not its format, or over 20 KB): a bug of the "
        "notifier; please report it with the log",
    }
    # 5 a second and 100 a minute; each period made longer for the time a request takes.
    rate_limits = ((5, 1.2), (100, 61.0))

    def answer_code(self, answer: dict[str, Any]) -> tuple[Any, Any]:
        if "code" in answer:
            return answer["code"], answer.get("msg")
        return answer.get("StatusCode"), answer.get("StatusMessage")  # older deployments

    def body(self, text: str) -> dict[str, Any]:
        return {"msg_type": "text", "content": {"text": text}}

    def request(self, text: str) -> tuple[str, dict[str, Any]]:
        body = self.body(text)
        if self.secret:
            timestamp = int(time.time())
            body = {"timestamp": str(timestamp), "sign": sign(self.secret, timestamp), **body}
        return self.webhook, body
