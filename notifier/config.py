"""The notifier's one typed configuration: flags over ``VIGIL_NOTIFIER_*`` variables over
defaults. The relays' webhooks and secrets are best given as variables (VIGIL_NOTIFIER_
DINGTALK_SECRET, ...), which stay off the command line and out of `ps`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from vigil.options import (
    ConfigError,
    Option,
    OptionSet,
    hidden,
    optional_str,
    port,
    positive_float,
    positive_int,
    url_origin,
)

ENV_PREFIX = "VIGIL_NOTIFIER_"
__all__ = ["NotifierConfig", "ConfigError", "OPTIONS", "load_config"]


def _webhook(text: str) -> str | None:
    """A robot's webhook URL, or None for an empty value (the relay is off)."""
    if not text:
        return None
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL")
    return text


def _robot_options(tool: str, robot: str, example: str, setting: str) -> tuple[Option, Option]:
    """A relay's two options: its robot's webhook and its signing secret, neither of which an
    error ever shows whole."""
    return (
        Option(
            f"{tool}_webhook",
            _webhook,
            f"{robot} webhook ({example}): relay every notification there.",
            metavar="URL",
            show=url_origin,  # a refused value is shown as scheme://host/… at most
        ),
        Option(
            f"{tool}_secret",
            optional_str,
            f"The {robot}'s signing secret ({setting}): its requests are signed with it. Prefer "
            "the variable to the flag.",
            metavar="SECRET",
            show=hidden,
        ),
    )


OPTIONS: tuple[Option, ...] = (
    Option("host", str, "Address the webhook receiver listens on.", metavar="HOST"),
    Option(
        "port",
        port,
        "Port the webhook receiver listens on (0: any free port, said in the listening line).",
        metavar="PORT",
    ),
    Option(
        "watchdog_timeout",
        positive_float,
        "Dead man's switch: seconds without the Watchdog alert on POST /watchdog (Alertmanager "
        "repeats it every minute) before the notifier says the alerting pipeline is broken and "
        "relays that alarm; counted from the start until the first Watchdog arrives.",
        metavar="SECONDS",
    ),
    *_robot_options(
        "dingtalk",
        "DingTalk custom robot",
        "https://oapi.dingtalk.com/robot/send?access_token=...",
        "加签, SEC...",
    ),
    *_robot_options(
        "feishu",
        "Feishu/Lark custom bot",
        "https://open.feishu.cn/open-apis/bot/v2/hook/...",
        "签名校验",
    ),
    Option(
        "relay_attempts",
        positive_int,
        "Attempts per message and relay before it is given up (logged and printed); a refusal "
        "that no retry changes (a robot's secret, keyword or IP allow-list) is given up at once, "
        "with what to check.",
        metavar="N",
    ),
    Option(
        "relay_retry_delay",
        positive_float,
        "Seconds before the second attempt; each later one waits twice as long, at most 60 s.",
        metavar="SECONDS",
    ),
    Option(
        "relay_throttle_wait",
        positive_float,
        "Seconds to wait when a robot answers that this notifier sends too fast (DingTalk: "
        "410100 or 130101, after which it refuses for 10 minutes; Feishu: 11232; HTTP 429) "
        "before trying again; such waits spend no attempt, at most 12 per message. The "
        "notifier also keeps to each robot's documented rate (DingTalk 20 a minute; Feishu 5 a "
        "second, 100 a minute) and sends what waits as one message.",
        metavar="SECONDS",
    ),
    Option(
        "relay_timeout",
        positive_float,
        "Seconds one request to a relay may take.",
        metavar="SECONDS",
    ),
    Option(
        "relay_queue",
        positive_int,
        "Messages waiting per relay at most; one more is dropped (logged and printed).",
        metavar="N",
    ),
    Option(
        "log_level",
        str,
        "Lowest log level written (JSON lines on stderr; the notifications are printed on stdout).",
        choices=("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"),
    ),
)


@dataclass(frozen=True)
class NotifierConfig:
    host: str = "127.0.0.1"
    port: int = 5001
    # Alertmanager's deadmansswitch route repeats the Watchdog every minute: three minutes is
    # two missed notifications and the slack of Prometheus's evaluation and resend intervals.
    watchdog_timeout: float = 180.0
    dingtalk_webhook: str | None = None
    dingtalk_secret: str | None = None
    feishu_webhook: str | None = None
    feishu_secret: str | None = None
    relay_attempts: int = 8  # 2+4+8+16+32+60+60 s of waits: a relay down for three minutes
    relay_retry_delay: float = 2.0
    relay_throttle_wait: float = 60.0  # x 12: past DingTalk's 10 minutes of throttling
    relay_timeout: float = 10.0
    relay_queue: int = 100
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        for tool in ("dingtalk", "feishu"):
            if getattr(self, f"{tool}_secret") and not getattr(self, f"{tool}_webhook"):
                raise ConfigError(
                    f"--{tool}-secret ({ENV_PREFIX}{tool.upper()}_SECRET) is set but "
                    f"--{tool}-webhook ({ENV_PREFIX}{tool.upper()}_WEBHOOK) is not"
                )

    @property
    def relays(self) -> tuple[str, ...]:
        return tuple(t for t in ("dingtalk", "feishu") if getattr(self, f"{t}_webhook"))


_OPTION_SET = OptionSet(
    ENV_PREFIX,
    OPTIONS,
    NotifierConfig,
    prog="python -m notifier",
    description="Alertmanager webhook receiver: prints each notification, relays it to DingTalk "
    "and Feishu/Lark robots, and alarms when the Watchdog stops arriving.",
)
OPTIONS = _OPTION_SET.options


def load_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> NotifierConfig:
    return _OPTION_SET.load(argv, environ)
