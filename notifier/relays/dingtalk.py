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

The answer is HTTP 200 with {"errcode": 0, "errmsg": "ok"} on success. The error codes of the
custom robot's send page (https://open.dingtalk.com/document/orgapp/custom-robots-send-group-
messages, its table as other clients copy it) and what the notifier does with them:
- 310000, the security check failed: "keywords not in content", "sign not match" or "ip ... not
  in whitelist" (and an expired timestamp): refused, given up at once with a hint;
- 400013 群已被解散 (the group is gone), 400101 access_token不存在, 400102 机器人已停用,
  400106 机器人不存在, 430101-430104 (content refused as unsafe or inappropriate): refused;
- 410100 发送速度太快而限流, and 130101 "send too fast, exceed 20 times per minute" as seen in
  the wild (ccfos/nightingale#369): throttled; each robot takes 20 messages a minute and, past
  that, refuses for 10 minutes ("每个机器人每分钟最多发送20条消息到群里，如果超过20条，会限流10
  分钟", the send page as quoted by violetpupil/gos api/ding/ding.go): waited out, and paced on
  this side at 20 a minute;
- anything else (-1 系统繁忙, ...): retried.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from . import Relay

_SECURITY = (
    "check the robot's security settings in DingTalk: its signing secret (加签; "
    "VIGIL_NOTIFIER_DINGTALK_SECRET), its keyword (every message starts with [llm-vigil]: make "
    "that a keyword), its IP allow-list (this machine's public address), and this machine's "
    "clock (a signature is good for an hour)"
)
_WEBHOOK = "check VIGIL_NOTIFIER_DINGTALK_WEBHOOK: the robot it names cannot take messages"
_CONTENT = "DingTalk refuses this message's content; the console and the log have it"


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
    title = "DingTalk"
    max_body_bytes = 20_000
    limit_name = "DingTalk's 20000-byte message limit"
    code_field, message_field = "errcode", "errmsg"
    throttled_codes = frozenset({410100, 130101})
    refusals = {
        310000: _SECURITY,
        400013: "the robot's group has been disbanded: " + _WEBHOOK,
        400101: "DingTalk knows no such access_token: " + _WEBHOOK,
        400102: "the robot is disabled (机器人已停用): enable it in the group's settings",
        400106: "the robot does not exist (was it removed from the group?): " + _WEBHOOK,
        **dict.fromkeys((430101, 430102, 430103, 430104), _CONTENT),
    }
    # 20 a minute; the minute made a second longer for the time a request takes to get there.
    rate_limits = ((20, 61.0),)

    def body(self, text: str) -> dict[str, Any]:
        return {"msgtype": "text", "text": {"content": text}}

    def request(self, text: str) -> tuple[str, dict[str, Any]]:
        url = self.webhook
        if self.secret:
            url = signed_url(self.webhook, self.secret, int(time.time() * 1000))
        return url, self.body(text)
