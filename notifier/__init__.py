"""The notifier of llm-vigil: the receiver that Alertmanager's webhooks reach (POST /alerts and
POST /watchdog on 127.0.0.1:5001). It prints every notification where a person sees it, relays
it to DingTalk and Feishu/Lark custom robots (signed webhooks, which Alertmanager cannot send to
itself), and raises the alarm when the always-firing Watchdog stops arriving (a dead man's
switch for Prometheus -> Alertmanager -> here). Part of the light install: standard library,
requests, loguru and prometheus-client only."""

__version__ = "0.1.0"
