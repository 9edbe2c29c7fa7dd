"""The notifier (``python -m notifier``), as a real process on loopback:

- a real Alertmanager (Debian package prometheus-alertmanager) with the shipped alertmanager.yml,
  pointed at the notifier, sends it real notifications: FIRING with severity, summary, location
  and runbook, then RESOLVED, and the Watchdog ("alerting pipeline OK");
- stand-ins for DingTalk's and Feishu's custom robots on loopback check every request's signature
  with the algorithm each tool documents, written here again (not imported from the notifier),
  and answer with the tools' own success and error bodies: verified delivery, retries after a 500
  and after an error code in a 200, the give-up after bounded attempts (logged, printed,
  counted), and the size limits kept for a notification of 500 alerts;
- the dead man's switch with a short --watchdog-timeout: the alarm (printed and relayed), the
  recovery, the alarm again;
- bad requests: a body that is not JSON or not the payload (400 with a JSON error), other paths
  and methods (404, 405), bad options (exit 2 with a message that says what is wanted).

No assertion is about speed: every wait is generous and polls.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import pytest
import requests
import yaml
from conftest import start_alertmanager

REPO = Path(__file__).resolve().parents[1]
ALERTS = REPO / "alerts"
LISTENING = re.compile(r"notifier listening on http://([^ ]+)")
DINGTALK_SECRET = "SECc0ffee0123456789abcdef0123456789abcdef0123456789abcdef012345"
FEISHU_SECRET = "f3ishuS3cretK3y/+="
SIZE_LIMIT = 20_000  # bytes of request body; DingTalk's and Feishu's documented limits


def wait_until(predicate, timeout: float, what: str, details=lambda: "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}\n{details()}")


# --- the notifier as a process ------------------------------------------------------------


class NotifierProcess:
    def __init__(self, tmp_path: Path, *args: str, env: dict[str, str] | None = None):
        self.out_path = tmp_path / "notifier.out"
        self.err_path = tmp_path / "notifier.err"
        environment = {k: v for k, v in os.environ.items() if not k.startswith("VIGIL_NOTIFIER_")}
        environment.update(env or {})
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "notifier", "--host", "127.0.0.1", "--port", "0", *args],
                stdout=out,
                stderr=err,
                cwd=REPO,
                env=environment,
            )
        match = wait_until(
            lambda: self.process.poll() is None and LISTENING.search(self.stdout()),
            30,
            "the notifier's listening line",
            self.output,
        )
        self.base_url = f"http://{match.group(1)}"

    def stdout(self) -> str:
        return self.out_path.read_text(encoding="utf-8", errors="replace")

    def stderr(self) -> str:
        return self.err_path.read_text(encoding="utf-8", errors="replace")

    def output(self) -> str:
        return f"stdout:\n{self.stdout()[-4000:]}\nstderr:\n{self.stderr()[-4000:]}"

    def log(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stderr().splitlines() if line.startswith("{")]

    def wait_for_line(self, pattern: str, timeout: float = 30.0, count: int = 1) -> list[str]:
        regex = re.compile(pattern)

        def found() -> list[str]:
            lines = [line for line in self.stdout().splitlines() if regex.search(line)]
            return lines if len(lines) >= count else []

        return wait_until(found, timeout, f"{count} stdout line(s) matching {pattern}", self.output)

    def post(self, path: str, payload: Any) -> requests.Response:
        return requests.post(self.base_url + path, json=payload, timeout=10)

    def metric(self, name: str, **labels: str) -> float:
        text = requests.get(self.base_url + "/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                got = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
                if got == labels:
                    return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@pytest.fixture
def start_notifier(tmp_path):
    started: list[NotifierProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> NotifierProcess:
        directory = tmp_path / f"notifier{len(started)}"
        directory.mkdir()
        notifier = NotifierProcess(directory, *args, env=env)
        started.append(notifier)
        return notifier

    yield start
    for notifier in started:
        assert notifier.stop() == 0, notifier.output()
        assert "Traceback" not in notifier.stderr(), notifier.output()


# --- payloads as Alertmanager writes them (version 4) --------------------------------------


def alert(
    name: str = "InferenceEngineStalled",
    status: str = "firing",
    severity: str = "critical",
    summary: str = "Engine of demo stalled for 31 s",
    description: str = "No decode step finished for 31 s with 2 requests running.",
    **labels: str,
) -> dict[str, Any]:
    return {
        "status": status,
        "labels": {"alertname": name, "severity": severity, **labels},
        "annotations": {
            "summary": summary,
            "description": description,
            "runbook_url": f"https://github.com/llm-vigil/llm-vigil/blob/main/alerts/runbooks/{name}.md",
        },
        "startsAt": "2026-11-30T01:00:00.000Z",
        "endsAt": "0001-01-01T00:00:00Z" if status == "firing" else "2026-11-30T01:05:00.000Z",
        "generatorURL": "http://127.0.0.1:9090/graph?g0.expr=vector%281%29",
        "fingerprint": hashlib.sha256(name.encode()).hexdigest()[:16],
    }


def payload(*alerts: dict[str, Any], truncated: int = 0) -> dict[str, Any]:
    status = "firing" if any(a["status"] == "firing" for a in alerts) else "resolved"
    return {
        "version": "4",
        "groupKey": '{}/{severity="critical"}:{alertname="InferenceEngineStalled"}',
        "truncatedAlerts": truncated,
        "status": status,
        "receiver": "webhook",
        "groupLabels": {"alertname": alerts[0]["labels"]["alertname"]},
        "commonLabels": {"alertname": alerts[0]["labels"]["alertname"]},
        "commonAnnotations": {},
        "externalURL": "http://127.0.0.1:9093",
        "alerts": list(alerts),
    }


# --- a real Alertmanager -------------------------------------------------------------------


def alertmanager_config(notifier_url: str) -> str:
    """The shipped alertmanager.yml, its webhooks pointed at the notifier, 1 s grouping."""
    config = yaml.safe_load((ALERTS / "alertmanager.yml").read_text())
    urls = []
    for receiver in config["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            path = urlsplit(hook["url"]).path
            assert urlsplit(hook["url"]).netloc == "127.0.0.1:5001", hook["url"]
            hook["url"] = notifier_url + path
            urls.append(path)
    assert sorted(urls) == ["/alerts", "/watchdog"]

    def shorten(route):
        for key in ("group_wait", "group_interval"):
            if key in route or route is config["route"]:
                route[key] = "1s"
        for child in route.get("routes", []):
            shorten(child)

    shorten(config["route"])
    return yaml.safe_dump(config)


def fire(manager, *alerts: dict[str, Any]) -> None:
    """Alerts into Alertmanager through its API v2, as Prometheus sends them."""
    body = [
        {k: a[k] for k in ("labels", "annotations", "startsAt", "endsAt", "generatorURL")}
        for a in alerts
    ]
    response = requests.post(manager.base_url + "/api/v2/alerts", json=body, timeout=10)
    assert response.status_code == 200, response.text


def rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@pytest.mark.skipif(
    shutil.which("prometheus-alertmanager") is None and shutil.which("alertmanager") is None,
    reason="alertmanager is not installed (Debian package prometheus-alertmanager)",
)
def test_real_alertmanager_notifications_are_printed_for_a_person(start_notifier, tmp_path):
    notifier = start_notifier()
    manager = start_alertmanager(tmp_path, alertmanager_config(notifier.base_url))
    try:
        now = datetime.now(UTC)
        stalled = alert(instance="127.0.0.1:8000", model="demo", stage="decode")
        stalled["startsAt"] = rfc3339(now)
        stalled["endsAt"] = rfc3339(now + timedelta(minutes=10))
        # With the labels alerts/meta.rules.yml gives it: the route to /watchdog matches them.
        watchdog = alert(
            "Watchdog", severity="info", summary="Alerting pipeline heartbeat", cause="watchdog"
        )
        watchdog["startsAt"], watchdog["endsAt"] = stalled["startsAt"], stalled["endsAt"]
        fire(manager, stalled, watchdog)

        (line,) = notifier.wait_for_line(r"FIRING .*InferenceEngineStalled")
        assert re.search(
            r"^\S+Z FIRING \[critical\] InferenceEngineStalled instance=127\.0\.0\.1:8000 "
            r"model=demo stage=decode: Engine of demo stalled for 31 s \| runbook: "
            r"https://github\.com/llm-vigil/llm-vigil/blob/main/alerts/runbooks/"
            r"InferenceEngineStalled\.md$",
            line,
        ), line
        notifier.wait_for_line(r"alerting pipeline OK: Watchdog received from Alertmanager")

        # Resolved: the same alert with its end in the past.
        stalled["endsAt"] = rfc3339(datetime.now(UTC) - timedelta(seconds=1))
        fire(manager, stalled)
        (line,) = notifier.wait_for_line(r"RESOLVED .*InferenceEngineStalled")
        assert "RESOLVED [critical] InferenceEngineStalled instance=127.0.0.1:8000" in line
        assert "| runbook: https://" in line
    finally:
        manager.stop()

    # The Watchdog is never printed as an alert line; each alert is logged once, with fields.
    assert "Watchdog:" not in notifier.stdout() and "] Watchdog" not in notifier.stdout()
    logged = [r for r in notifier.log() if r["message"] == "alert notification"]
    assert [(r["status"], r["alertname"], r["level"]) for r in logged] == [
        ("firing", "InferenceEngineStalled", "WARNING"),
        ("resolved", "InferenceEngineStalled", "INFO"),
    ]
    assert logged[0]["receiver"] == "webhook" and logged[0]["model"] == "demo"
    assert logged[0]["runbook_url"].endswith("/InferenceEngineStalled.md")
    assert notifier.metric("vigil_notifier_notifications_total", endpoint="alerts", status="firing")
    assert notifier.metric(
        "vigil_notifier_notifications_total", endpoint="watchdog", status="firing"
    )


# --- DingTalk and Feishu stand-ins ---------------------------------------------------------


def dingtalk_signature(secret: str, timestamp: str) -> str:
    """DingTalk's 加签: HmacSHA256 keyed with the secret over "timestamp\\nsecret", Base64
    (https://open.dingtalk.com/document/robots/customize-robot-security-settings)."""
    mac = hmac.new(secret.encode(), f"{timestamp}\n{secret}".encode(), hashlib.sha256)
    return base64.b64encode(mac.digest()).decode()


def feishu_signature(secret: str, timestamp: str) -> str:
    """Feishu's 签名校验: HmacSHA256 keyed with "timestamp\\nsecret" over nothing, Base64
    (https://open.feishu.cn/document/client-docs/bot-v3/add-custom-bot)."""
    mac = hmac.new(f"{timestamp}\n{secret}".encode(), b"", hashlib.sha256)
    return base64.b64encode(mac.digest()).decode()


# Known answers, computed apart from any Python (neither tool's page shows a worked example):
#   printf '%s\n%s' 1700000000000 SECd0c5a11e7e57vect0r \
#     | openssl dgst -sha256 -hmac SECd0c5a11e7e57vect0r -binary | base64
#   printf '' | openssl dgst -sha256 -hmac "$(printf '%s\n%s' 1700000000 fe1shu-kn0wn-answer)" \
#     -binary | base64
# (OpenSSL 3.0): DingTalk keys the HMAC with the secret over "<ms>\n<secret>"; Feishu keys it
# with "<s>\n<secret>" over nothing.
DINGTALK_KNOWN = (
    "SECd0c5a11e7e57vect0r",
    1700000000000,
    "RXcyJpGIszBzxu3vaL9iUpBH3eqn0oNGE9A/7K1O5vg=",
)
FEISHU_KNOWN = ("fe1shu-kn0wn-answer", 1700000000, "Mpetn3o4AUuT044m+JNivePLwg+izh4igJkgRhAOf2I=")


def test_the_signatures_match_known_answers_computed_with_openssl(monkeypatch):
    """The stand-in robots check signatures with the formulas written again here; these fixed
    values, from openssl, anchor both those and the notifier's to the documented algorithm."""
    import notifier.relays.feishu as feishu_module
    from notifier.relays import dingtalk, feishu

    secret, timestamp, expected = DINGTALK_KNOWN
    assert dingtalk.sign(secret, timestamp) == expected
    assert dingtalk_signature(secret, str(timestamp)) == expected
    url = dingtalk.signed_url(
        "https://oapi.dingtalk.com/robot/send?access_token=t", secret, timestamp
    )
    assert url == (
        "https://oapi.dingtalk.com/robot/send?access_token=t&timestamp=1700000000000"
        "&sign=RXcyJpGIszBzxu3vaL9iUpBH3eqn0oNGE9A%2F7K1O5vg%3D"  # URL-encoded, as documented
    )

    secret, timestamp, expected = FEISHU_KNOWN
    assert feishu.sign(secret, timestamp) == expected
    assert feishu_signature(secret, str(timestamp)) == expected
    monkeypatch.setattr(feishu_module.time, "time", lambda: timestamp + 0.75)
    _, body = feishu.Feishu("https://open.feishu.cn/open-apis/bot/v2/hook/x", secret).request("hi")
    assert body == {
        "timestamp": "1700000000",
        "sign": expected,
        "msg_type": "text",
        "content": {"text": "hi"},
    }


DINGTALK_OK = (200, {"errcode": 0, "errmsg": "ok"})
FEISHU_OK = (200, {"code": 0, "msg": "success", "data": {}})
DINGTALK_BAD_SIGN = (200, {"errcode": 310000, "errmsg": "sign not match"})
FEISHU_BAD_SIGN = (
    200,
    {"code": 19021, "msg": "sign match fail or timestamp is not within one hour", "data": {}},
)
DINGTALK_BUSY = (200, {"errcode": -1, "errmsg": "系统繁忙"})
# DingTalk's answers when a robot sends more than 20 messages a minute: 130101 as seen in the
# wild (ccfos/nightingale#369), 410100 in its custom robot error table.
DINGTALK_THROTTLED = (
    200,
    {"errcode": 130101, "errmsg": "send too fast, exceed 20 times per minute"},
)
DINGTALK_TOO_FAST = (200, {"errcode": 410100, "errmsg": "发送速度太快而限流"})
FEISHU_THROTTLED = (200, {"code": 11232, "msg": "frequency limited", "data": {}})
FEISHU_NO_KEYWORD = (200, {"code": 19024, "msg": "Key Words Not Found"})
FEISHU_IP_NOT_ALLOWED = (200, {"code": 19022, "msg": "Ip Not Allowed"})
# A proxy in front of the robot answers with its own page, echoing the request's path (where
# Feishu's hook id and DingTalk's access token and signature travel).
PROXY_ERROR = (
    502,
    "<html><body><h1>502 Bad Gateway</h1>upstream failed: POST {path}</body></html>",
)


class FakeRobot:
    """A DingTalk or Feishu custom robot on loopback. Each request is checked as the real one
    checks it (signature, timestamp within the hour, size, and with ``per_minute`` DingTalk's
    20 messages a minute) and answered from ``script`` (then with success); every request is
    recorded with what the check found. An answer whose body is a string is sent as an HTML
    page, its ``{path}`` replaced by the request's path (a proxy's error page that echoes it);
    ``answer_delay`` seconds pass before each answer (a slow robot, so that a backlog builds)."""

    def __init__(
        self,
        kind: str,
        secret: str,
        script: list[tuple[int, Any]] = (),
        *,
        per_minute: int | None = None,
        answer_delay: float = 0.0,
    ):
        self.kind = kind
        self.secret = secret
        self.script = list(script)
        self.per_minute = per_minute
        self.answer_delay = answer_delay
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        robot = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                record = robot.check(self.path, self.headers.get("Content-Type", ""), raw)
                with robot._lock:
                    now = time.monotonic()
                    recent = [r for r in robot.requests if now - r["at"] < 60]
                    if robot.per_minute is not None and len(recent) >= robot.per_minute:
                        record["refusal"] = record["refusal"] or DINGTALK_THROTTLED
                    record["at"] = now
                    robot.requests.append(record)
                    scripted = robot.script.pop(0) if robot.script else None
                status, answer = record["refusal"] or scripted or robot.success
                if isinstance(answer, str):
                    body, content_type = answer.format(path=self.path).encode(), "text/html"
                else:
                    body, content_type = json.dumps(answer).encode(), "application/json"
                time.sleep(robot.answer_delay)
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        port = self.server.server_port
        if kind == "dingtalk":
            self.url = f"http://127.0.0.1:{port}/robot/send?access_token=t0ken"
            self.success = DINGTALK_OK
        else:
            self.url = f"http://127.0.0.1:{port}/open-apis/bot/v2/hook/b0t-id"
            self.success = FEISHU_OK

    def check(self, path: str, content_type: str, raw: bytes) -> dict[str, Any]:
        body = json.loads(raw.decode("utf-8"))
        query = parse_qs(urlsplit(path).query)
        now = time.time()
        if self.kind == "dingtalk":
            (timestamp,) = query["timestamp"]
            # The signature as sent: URL-encoded ("最后再把签名参数再进行urlEncode"), so no raw
            # +, / or = of Base64 may reach the query string.
            raw_sign = dict(p.split("=", 1) for p in urlsplit(path).query.split("&"))["sign"]
            expected = quote(dingtalk_signature(self.secret, timestamp), safe="")
            verified = (
                query.get("access_token") == ["t0ken"]
                and abs(int(timestamp) / 1000 - now) < 3600
                and hmac.compare_digest(raw_sign, expected)
                and body["msgtype"] == "text"
            )
            text = body["text"]["content"]
            refusal = None if verified else DINGTALK_BAD_SIGN
            if len(raw) > SIZE_LIMIT:
                refusal = (200, {"errcode": 460101, "errmsg": "message too long"})
        else:
            timestamp, signature = body["timestamp"], body["sign"]
            verified = (
                abs(int(timestamp) - now) < 3600
                and hmac.compare_digest(signature, feishu_signature(self.secret, timestamp))
                and body["msg_type"] == "text"
            )
            text = body["content"]["text"]
            refusal = None if verified else FEISHU_BAD_SIGN
            if len(raw) > SIZE_LIMIT:
                refusal = (400, {"code": 9499, "msg": "Bad Request", "data": {}})
        return {
            "verified": verified,
            "text": text,
            "size": len(raw),
            "utf8_json": content_type.startswith("application/json") and "utf-8" in content_type,
            "refusal": refusal,
        }

    def texts(self) -> list[str]:
        with self._lock:
            return [r["text"] for r in self.requests]

    def wait_for_requests(self, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        def enough():
            with self._lock:
                return list(self.requests) if len(self.requests) >= count else None

        return wait_until(enough, timeout, f"{count} request(s) at the {self.kind} robot")

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def robots():
    made: list[FakeRobot] = []

    def make(kind: str, script=(), **options) -> FakeRobot:
        secret = DINGTALK_SECRET if kind == "dingtalk" else FEISHU_SECRET
        robot = FakeRobot(kind, secret, script, **options)
        made.append(robot)
        return robot

    yield make
    for robot in made:
        robot.stop()


def relay_env(dingtalk: FakeRobot | None, feishu: FakeRobot | None) -> dict[str, str]:
    """The relays as the environment gives them (secrets stay off the command line)."""
    env = {}
    if dingtalk:
        env["VIGIL_NOTIFIER_DINGTALK_WEBHOOK"] = dingtalk.url
        env["VIGIL_NOTIFIER_DINGTALK_SECRET"] = dingtalk.secret
    if feishu:
        env["VIGIL_NOTIFIER_FEISHU_WEBHOOK"] = feishu.url
        env["VIGIL_NOTIFIER_FEISHU_SECRET"] = feishu.secret
    return env


FAST_RETRIES = ("--relay-attempts", "3", "--relay-retry-delay", "0.2")


def test_relays_sign_as_documented_and_carry_the_alert(start_notifier, robots):
    dingtalk, feishu = robots("dingtalk"), robots("feishu")
    notifier = start_notifier(*FAST_RETRIES, env=relay_env(dingtalk, feishu))
    assert "relays: dingtalk, feishu" in notifier.stdout()
    assert DINGTALK_SECRET not in notifier.stdout() + notifier.stderr()

    firing = alert(instance="127.0.0.1:8000", model="demo", gpu="0")
    response = notifier.post("/alerts", payload(firing))
    assert response.status_code == 200 and response.json()["status"] == "ok"

    for robot in (dingtalk, feishu):
        (request,) = robot.wait_for_requests(1)
        assert request["verified"] and request["utf8_json"], request
        text = request["text"]
        assert text.startswith("[llm-vigil] [FIRING:1] InferenceEngineStalled"), text
        assert "FIRING [critical] InferenceEngineStalled" in text
        assert "instance=127.0.0.1:8000 model=demo gpu=0" in text
        assert "Engine of demo stalled for 31 s" in text
        assert "No decode step finished for 31 s" in text
        assert "Runbook: https://github.com/llm-vigil/" in text

    # ?relay= picks the relays; an unknown one is said, not silently ignored.
    resolved = alert(status="resolved", instance="127.0.0.1:8000", model="demo")
    assert notifier.post("/alerts?relay=feishu,dingding", payload(resolved)).status_code == 200
    notifier.wait_for_line(r"RELAY FAILED: /alerts\?relay=dingding .* does not exist")
    feishu.wait_for_requests(2)
    assert "[RESOLVED] InferenceEngineStalled" in feishu.texts()[1]
    assert (
        "Since: 2026-11-30T01:00:00.000Z, resolved: 2026-11-30T01:05:00.000Z" in (feishu.texts()[1])
    )
    # A third notification, to every relay: DingTalk's queue is in order, so its second
    # message being this one shows that the ?relay=feishu one never went there.
    other = alert("InferenceQueueGrowing", severity="warning", summary="Queue of demo grows")
    assert notifier.post("/alerts", payload(other)).status_code == 200
    feishu.wait_for_requests(3)
    dingtalk.wait_for_requests(2)
    assert "InferenceQueueGrowing" in dingtalk.texts()[1]
    assert all(r["verified"] for r in dingtalk.requests + feishu.requests)
    for relay, count in (("dingtalk", 2), ("feishu", 3)):  # counted once the answer is read
        wait_until(
            lambda relay=relay, count=count: (
                notifier.metric("vigil_notifier_relay_messages_total", relay=relay, outcome="sent")
                == count
            ),
            30,
            f"{count} messages counted as sent to {relay}",
        )


def test_a_relay_error_is_retried_with_backoff_until_it_is_taken(start_notifier, robots):
    dingtalk = robots("dingtalk", [(500, {"error": "internal"}), DINGTALK_BUSY])
    feishu = robots("feishu", [(503, "<html>Service Unavailable</html>")])
    notifier = start_notifier(*FAST_RETRIES, env=relay_env(dingtalk, feishu))
    assert notifier.post("/alerts", payload(alert())).status_code == 200

    requests_seen = dingtalk.wait_for_requests(3)
    assert all(r["verified"] for r in requests_seen)  # each attempt signed afresh, and right
    assert len({r["text"] for r in requests_seen}) == 1
    assert all(r["verified"] for r in feishu.wait_for_requests(2))
    notifier.wait_for_line(r"relay dingtalk: attempt 1/3 for FIRING .* failed \(HTTP 500")
    notifier.wait_for_line(
        r"relay dingtalk: attempt 2/3 for FIRING .* failed \(DingTalk refused the message: "
        r"errcode -1, errmsg '系统繁忙'"
    )
    notifier.wait_for_line(r"relay dingtalk: FIRING .* sent at attempt 3")
    notifier.wait_for_line(r"relay feishu: attempt 1/3 .* failed \(HTTP 503: <html>Service")
    notifier.wait_for_line(r"relay feishu: FIRING .* sent at attempt 2")
    assert notifier.metric("vigil_notifier_relay_failures_total", relay="dingtalk") == 2
    assert notifier.metric("vigil_notifier_relay_failures_total", relay="feishu") == 1
    assert "RELAY FAILED" not in notifier.stdout()


def test_a_relay_that_keeps_failing_is_given_up_loudly(start_notifier, robots):
    dingtalk = robots("dingtalk", [DINGTALK_BUSY] * 10)
    notifier = start_notifier(*FAST_RETRIES, env=relay_env(dingtalk, None))
    assert notifier.post("/alerts", payload(alert())).status_code == 200

    (line,) = notifier.wait_for_line(r"RELAY FAILED: dingtalk did not take FIRING")
    assert "after 3 attempts" in line
    assert len(dingtalk.requests) == 3  # bounded: no fourth attempt
    gave_up = [r for r in notifier.log() if r["message"].startswith("relay gave up")]
    assert (
        len(gave_up) == 1 and gave_up[0]["relay"] == "dingtalk" and gave_up[0]["level"] == "ERROR"
    )
    failures = [r for r in notifier.log() if r["message"].startswith("relay attempt failed")]
    assert [r["attempt"] for r in failures] == [1, 2, 3]
    assert all("errcode -1" in r["message"] for r in failures)
    assert (
        notifier.metric("vigil_notifier_relay_messages_total", relay="dingtalk", outcome="gave_up")
        == 1
    )


@pytest.mark.parametrize(
    ("kind", "refusal", "hint"),
    [
        ("dingtalk", DINGTALK_BAD_SIGN, "check the robot's security settings in DingTalk"),
        ("feishu", FEISHU_BAD_SIGN, "check the bot's signing secret in Feishu"),
        ("feishu", FEISHU_IP_NOT_ALLOWED, "check the bot's IP allow-list in Feishu"),
        ("feishu", FEISHU_NO_KEYWORD, "check the bot's keywords in Feishu"),
        ("feishu", (400, {"code": 9499, "msg": "Bad Request", "data": {}}), "could not read"),
    ],
)
def test_a_refusal_no_retry_changes_is_given_up_at_once_with_a_hint(
    start_notifier, robots, kind, refusal, hint
):
    robot = robots(kind, [refusal])
    env = relay_env(robot, None) if kind == "dingtalk" else relay_env(None, robot)
    notifier = start_notifier("--relay-attempts", "5", "--relay-retry-delay", "0.2", env=env)
    assert notifier.post("/alerts", payload(alert())).status_code == 200

    (line,) = notifier.wait_for_line(rf"RELAY FAILED: {kind} refused FIRING")
    assert hint in line and "not tried again" in line, line
    assert f"refused the message: {'errcode' if kind == 'dingtalk' else 'code'} " in line
    # The queue goes on at once: the next notification is sent, and the refused one was
    # tried once.
    other = alert("InferenceQueueGrowing", severity="warning", summary="Queue of demo grows")
    assert notifier.post("/alerts", payload(other)).status_code == 200
    robot.wait_for_requests(2)
    assert "InferenceQueueGrowing" in robot.texts()[1] and len(robot.requests) == 2
    (gave_up,) = [r for r in notifier.log() if r["message"].startswith("relay gave up")]
    assert gave_up["relay"] == kind and hint in gave_up["hint"] and gave_up["attempts"] == 1
    assert "trying again" not in notifier.stdout()
    assert notifier.metric("vigil_notifier_relay_messages_total", relay=kind, outcome="gave_up")


def test_a_throttling_robot_is_waited_out_without_spending_attempts(start_notifier, robots):
    dingtalk = robots("dingtalk", [DINGTALK_TOO_FAST, DINGTALK_THROTTLED])
    feishu = robots("feishu", [FEISHU_THROTTLED, (429, "<html>Too Many Requests</html>")])
    notifier = start_notifier(
        "--relay-attempts", "1", "--relay-throttle-wait", "0.2", env=relay_env(dingtalk, feishu)
    )
    assert notifier.post("/alerts", payload(alert())).status_code == 200

    for robot in (dingtalk, feishu):  # one attempt, yet taken at the third request
        requests_seen = robot.wait_for_requests(3)
        assert all(r["verified"] for r in requests_seen)
        notifier.wait_for_line(rf"relay {robot.kind}: FIRING .* sent at attempt 1")
    (first, second) = notifier.wait_for_line(r"relay dingtalk: .* the robot is throttling", count=2)
    assert "errcode 410100" in first and "errcode 130101" in second
    assert "trying again in 0.2 s (wait 1/12, no attempt spent)" in first
    notifier.wait_for_line(r"relay feishu: .* throttling this notifier \(Feishu refused .* 11232")
    notifier.wait_for_line(r"relay feishu: .* throttling this notifier \(HTTP 429: <html>Too")
    assert "RELAY FAILED" not in notifier.stdout()
    for relay in ("dingtalk", "feishu"):
        assert notifier.metric("vigil_notifier_relay_failures_total", relay=relay) == 0
    assert [r["level"] for r in notifier.log() if r["message"].startswith("relay throttled")] == [
        "WARNING"
    ] * 4


def test_a_storm_is_paced_and_sent_as_digests_that_the_robot_never_throttles(
    start_notifier, robots
):
    """A DingTalk robot that takes 20 messages a minute and answers slowly; 60 notifications
    at once. They wait for the robot and go as digests, in order, each within the size limit:
    the robot never throttles, and every alert arrives."""
    dingtalk = robots("dingtalk", per_minute=20, answer_delay=0.3)
    notifier = start_notifier(*FAST_RETRIES, env=relay_env(dingtalk, None))
    names = [f"StormAlert{i:02d}" for i in range(60)]
    for name in names:
        assert notifier.post("/alerts", payload(alert(name))).status_code == 200
    wait_until(
        lambda: all(any(name in text for text in dingtalk.texts()) for name in names),
        60,
        "every alert at the robot",
        notifier.output,
    )
    assert 1 < len(dingtalk.requests) <= 20, [t[:60] for t in dingtalk.texts()]
    assert all(r["verified"] and r["refusal"] is None for r in dingtalk.requests)
    joined = "\n".join(dingtalk.texts())
    assert [joined.index(f"[FIRING:1] {name}") for name in names] == sorted(
        joined.index(f"[FIRING:1] {name}") for name in names
    )
    assert re.search(r"^\[llm-vigil\] \d+ notifications, sent as one message", joined, re.M)
    wait_until(
        lambda: (
            notifier.metric("vigil_notifier_relay_messages_total", relay="dingtalk", outcome="sent")
            == 60
        ),
        30,
        "60 notifications counted as sent",
    )


def test_the_dead_mans_switch_goes_ahead_of_a_backlog_sent_as_one_digest(robots):
    """The relay's queue, in the process, to a robot on loopback: 30 messages wait, then the
    dead man's switch's alarm; the alarm goes first, then the 30 as one message, in order."""
    from notifier.delivery import RelayWorker
    from notifier.metrics import build_metrics
    from notifier.relays.dingtalk import DingTalk

    dingtalk = robots("dingtalk")
    said: list[str] = []
    worker = RelayWorker(
        DingTalk(dingtalk.url, dingtalk.secret),
        said.append,
        build_metrics(),
        attempts=3,
        retry_delay=0.1,
        timeout=10,
        queue_size=100,
        throttle_wait=0.1,
    )
    for i in range(30):
        worker.submit(f"[llm-vigil] [FIRING:1] Alert{i:02d}\n\ndetails", f"FIRING Alert{i:02d}")
    worker.submit("[llm-vigil] ALERTING PIPELINE BROKEN\n\n...", "BROKEN", urgent=True)
    worker.submit("[llm-vigil] alerting pipeline recovered\n\n...", "recovered", urgent=True)
    worker.start()
    try:
        dingtalk.wait_for_requests(3)
    finally:
        worker.stop()
    broken, recovered, backlog = dingtalk.texts()
    assert broken.startswith("[llm-vigil] ALERTING PIPELINE BROKEN")
    assert recovered.startswith("[llm-vigil] alerting pipeline recovered")
    assert backlog.startswith("[llm-vigil] 30 notifications, sent as one message")
    positions = [backlog.index(f"Alert{i:02d}") for i in range(30)]
    assert positions == sorted(positions)
    assert len(dingtalk.requests) == 3 and all(r["verified"] for r in dingtalk.requests)
    assert not [line for line in said if "RELAY FAILED" in line], said


def test_the_rate_limit_keeps_every_window_within_its_count():
    from notifier.delivery import RateLimit

    now = [100.0]
    pace = RateLimit([(5, 1.2), (100, 61.0)], clock=lambda: now[0])
    sent = []
    while len(sent) < 250:  # as the worker does: wait what it says, then send
        now[0] += pace.delay()
        pace.record()
        sent.append(now[0])
    for count, period in ((5, 1.2), (100, 61.0)):
        for i in range(len(sent) - count):
            assert sent[i + count] - sent[i] >= period - 1e-9, (count, period, i)
    assert sent[4] == 100.0 and sent[5] == 101.2  # a burst of 5 at once, then paced
    assert RateLimit([], clock=lambda: 0.0).delay() == 0


def test_an_unreachable_relay_is_retried_and_its_credentials_never_shown(start_notifier):
    with socket.socket() as closed:  # a port where nothing listens
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    env = {
        "VIGIL_NOTIFIER_DINGTALK_WEBHOOK": f"http://127.0.0.1:{port}/robot/send?access_token=t0k3n",
        "VIGIL_NOTIFIER_DINGTALK_SECRET": DINGTALK_SECRET,
        "VIGIL_NOTIFIER_FEISHU_WEBHOOK": f"http://127.0.0.1:{port}/open-apis/bot/v2/hook/h00k-id",
    }
    notifier = start_notifier("--relay-attempts", "2", "--relay-retry-delay", "0.1", env=env)
    assert notifier.post("/alerts", payload(alert())).status_code == 200
    for relay in ("dingtalk", "feishu"):
        notifier.wait_for_line(
            rf"relay {relay}: attempt 1/2 .* failed \(request failed: Connection"
        )
        notifier.wait_for_line(rf"RELAY FAILED: {relay} did not take FIRING .* after 2 attempts")
    shown = notifier.stdout() + notifier.stderr()
    for credential in ("t0k3n", "h00k-id", DINGTALK_SECRET, "sign="):
        assert credential not in shown, credential


def test_debug_logging_never_shows_the_relays_credentials(start_notifier, robots):
    """urllib3 logs every request line at DEBUG, query string included: not in the notifier."""
    dingtalk, feishu = robots("dingtalk"), robots("feishu")
    notifier = start_notifier("--log-level", "DEBUG", env=relay_env(dingtalk, feishu))
    assert notifier.post("/alerts", payload(alert())).status_code == 200
    watchdog = payload(alert("Watchdog", severity="info", summary="Alerting pipeline heartbeat"))
    assert notifier.post("/watchdog", watchdog).status_code == 200
    dingtalk.wait_for_requests(1)
    feishu.wait_for_requests(1)
    for relay in ("dingtalk", "feishu"):  # the answers are read: whatever is logged, is
        wait_until(
            lambda relay=relay: notifier.metric(
                "vigil_notifier_relay_messages_total", relay=relay, outcome="sent"
            ),
            30,
            f"the message counted as sent to {relay}",
        )
    assert any(r["level"] == "DEBUG" for r in notifier.log()), notifier.output()
    shown = notifier.stdout() + notifier.stderr()
    for credential in ("t0ken", "b0t-id", "access_token", "sign=", DINGTALK_SECRET, FEISHU_SECRET):
        assert credential not in shown, credential


@pytest.mark.parametrize(
    ("args", "env", "shown", "hidden"),
    [
        (
            [],
            {"VIGIL_NOTIFIER_DINGTALK_WEBHOOK": "oapi.dingtalk.com/robot/send?access_token=S3CR3T"},
            "VIGIL_NOTIFIER_DINGTALK_WEBHOOK: 'oapi.dingtalk.com/…' is not valid",
            ("S3CR3T", "access_token", "robot/send"),
        ),
        (
            ["--feishu-webhook", "ftp://open.feishu.cn/open-apis/bot/v2/hook/h00k-1d"],
            {},
            "--feishu-webhook: 'ftp://open.feishu.cn/…' is not valid",
            ("h00k-1d", "open-apis"),
        ),
        (
            [],
            {"VIGIL_NOTIFIER_FEISHU_WEBHOOK": "https:///open-apis/bot/v2/hook/h00k-1d"},
            "VIGIL_NOTIFIER_FEISHU_WEBHOOK: 'https://…' is not valid",
            ("h00k-1d", "open-apis"),
        ),
        (
            [],
            {
                "VIGIL_NOTIFIER_DINGTALK_WEBHOOK": "gopher://robot:pa55w0rd@example.com:70/x?k=S3CR3T"
            },
            "VIGIL_NOTIFIER_DINGTALK_WEBHOOK: 'gopher://example.com:70/…' is not valid",
            ("pa55w0rd", "robot:", "S3CR3T"),
        ),
        (
            [],
            {"VIGIL_NOTIFIER_DINGTALK_WEBHOOK": "S3CR3T"},
            "VIGIL_NOTIFIER_DINGTALK_WEBHOOK: (a value that is not a URL, not shown) is not valid",
            ("S3CR3T",),
        ),
    ],
)
def test_a_bad_webhook_is_refused_without_showing_its_credentials(args, env, shown, hidden):
    result = run_notifier(*args, env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert shown in result.stderr and "must be an http:// or https:// URL" in result.stderr
    for secret in hidden:
        assert secret not in result.stdout + result.stderr, secret


def test_a_proxys_error_page_echoing_the_webhook_never_shows_its_credentials(
    start_notifier, robots
):
    dingtalk, feishu = robots("dingtalk", [PROXY_ERROR]), robots("feishu", [PROXY_ERROR])
    notifier = start_notifier(*FAST_RETRIES, env=relay_env(dingtalk, feishu))
    assert notifier.post("/alerts", payload(alert())).status_code == 200
    for relay in ("dingtalk", "feishu"):
        (line,) = notifier.wait_for_line(
            rf"relay {relay}: attempt 1/3 for FIRING .* failed \(HTTP 502: <html>"
        )
        assert "502 Bad Gateway" in line and "upstream failed: POST /..." in line, line
        notifier.wait_for_line(rf"relay {relay}: FIRING .* sent at attempt 2")
    shown = notifier.stdout() + notifier.stderr()
    for credential in ("t0ken", "b0t-id", "access_token", "sign=", "timestamp="):
        assert credential not in shown, credential


def test_a_notification_of_many_alerts_is_cut_to_each_tools_size_limit(start_notifier, robots):
    dingtalk, feishu = robots("dingtalk"), robots("feishu")
    notifier = start_notifier(*FAST_RETRIES, env=relay_env(dingtalk, feishu))
    many = [
        alert(
            f"InferenceAlert{i:03d}",
            summary=f"推理引擎 {i} 卡住了 (engine {i} stalled)",
            description="显存不足 and a long explanation. " * 12,
            instance=f"10.0.0.{i % 250}:8000",
            model="glm-4.1v",
        )
        for i in range(500)
    ]
    assert notifier.post("/alerts", payload(*many, truncated=20)).status_code == 200
    assert len(notifier.wait_for_line(r"FIRING \[critical\] InferenceAlert", count=500)) == 500
    notifier.wait_for_line(r"20 more alerts Alertmanager left out")

    for robot, limit in ((dingtalk, "DingTalk's 20000-byte"), (feishu, "Feishu's 20 KB")):
        (request,) = robot.wait_for_requests(1)
        assert request["verified"] and request["refusal"] is None, request
        assert SIZE_LIMIT * 0.75 < request["size"] <= SIZE_LIMIT, request["size"]
        text = request["text"]
        shown = text.count("\n\nFIRING [critical] InferenceAlert")
        match = re.search(r"… (\d+) more alerts of this notification left out to fit (.+?);", text)
        assert match, text[-500:]
        assert shown >= 1 and shown + int(match.group(1)) == 500
        assert match.group(2).startswith(limit)
        assert "Alertmanager left out 20 more" in text
        assert text.rstrip().endswith("all of them: http://127.0.0.1:9093")
        # The alerts shown are the first ones, whole.
        assert f"InferenceAlert{shown - 1:03d}" in text and f"InferenceAlert{shown:03d}" not in text


def test_the_dead_mans_switch_alarms_relays_and_recovers(start_notifier, robots):
    feishu = robots("feishu")
    notifier = start_notifier("--watchdog-timeout", "3", env=relay_env(None, feishu))
    assert requests.get(notifier.base_url + "/health", timeout=5).json()["watchdog"] in (
        "waiting",
        "broken",
    )

    # None ever arrived: the alarm counts from the start.
    (line,) = notifier.wait_for_line(r"ALERTING PIPELINE BROKEN")
    assert "since the notifier started" in line and "--watchdog-timeout 3 s" in line
    (request,) = feishu.wait_for_requests(1)
    assert request["verified"]
    assert request["text"].startswith("[llm-vigil] ALERTING PIPELINE BROKEN")
    assert requests.get(notifier.base_url + "/health", timeout=5).json()["watchdog"] == "broken"
    assert notifier.metric("vigil_notifier_pipeline_broken") == 1

    # The Watchdog comes (as Alertmanager repeats it) while the recovery is checked.
    watchdog = payload(alert("Watchdog", severity="info", summary="Alerting pipeline heartbeat"))
    beating = threading.Event()
    beating.set()

    def heartbeat():
        while beating.is_set():
            assert notifier.post("/watchdog", watchdog).status_code == 200
            time.sleep(0.3)

    beat = threading.Thread(target=heartbeat, daemon=True)
    beat.start()
    try:
        notifier.wait_for_line(r"alerting pipeline recovered: Watchdog received from Alertmanager")
        feishu.wait_for_requests(2)
        assert "alerting pipeline recovered" in feishu.texts()[1]
        assert notifier.metric("vigil_notifier_pipeline_broken") == 0
        assert requests.get(notifier.base_url + "/health", timeout=5).json()["watchdog"] == "ok"
    finally:
        beating.clear()
        beat.join(10)

    # It stops: a second alarm, now counted from the last Watchdog.
    (_, again) = notifier.wait_for_line(r"ALERTING PIPELINE BROKEN", count=2)
    assert re.search(r"no Watchdog from Alertmanager for \d+ s", again), again
    feishu.wait_for_requests(3)
    assert notifier.stdout().count("alerting pipeline recovered") == 1
    # The Watchdog itself is never printed as an alert.
    assert "] Watchdog" not in notifier.stdout()


def test_bad_requests_are_answered_with_json_errors(start_notifier):
    notifier = start_notifier()
    url = notifier.base_url
    response = requests.post(
        url + "/alerts", data=b"{not json", headers={"Content-Type": "application/json"}, timeout=5
    )
    assert response.status_code == 400
    assert response.headers["Content-Type"] == "application/json"
    assert "not JSON" in response.json()["error"]

    for body, wanted in (
        ([], "must be a JSON object"),
        ({"version": "4"}, "'alerts' must be a list"),
        ({"alerts": [{"status": "pending", "labels": {}}]}, "alerts[0].status must be firing"),
        ({"alerts": [{"status": "firing", "labels": ["a"]}]}, "alerts[0].labels must be"),
    ):
        response = requests.post(url + "/watchdog", json=body, timeout=5)
        assert response.status_code == 400 and wanted in response.json()["error"], response.text

    assert requests.get(url + "/nowhere", timeout=5).status_code == 404
    assert requests.post(url + "/nowhere", json={}, timeout=5).status_code == 404
    response = requests.get(url + "/alerts", timeout=5)
    assert response.status_code == 405 and response.headers["Allow"] == "POST"
    response = requests.put(url + "/health", timeout=5)
    assert response.status_code == 405 and response.headers["Allow"] == "GET"
    health = requests.get(url + "/health", timeout=5)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    head = requests.head(url + "/health", timeout=5)
    assert head.status_code == 200 and not head.content
    # A bad request changes nothing and is no notification.
    assert "FIRING" not in notifier.stdout() and "RESOLVED" not in notifier.stdout()


def run_notifier(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("VIGIL_NOTIFIER_")}
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "notifier", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=environment,
    )


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (
            ["--port", "http"],
            {},
            "--port: 'http' is not valid (must be a TCP port from 0 to 65535)",
        ),
        (["--watchdog-timeout", "0"], {}, "must be a positive number of seconds"),
        (["--dingtalk-webhook", "oapi.dingtalk.com/robot"], {}, "must be an http:// or https://"),
        (
            [],
            {"VIGIL_NOTIFIER_FEISHU_SECRET": "s"},
            "--feishu-secret (VIGIL_NOTIFIER_FEISHU_SECRET) is set but --feishu-webhook",
        ),
        ([], {"VIGIL_NOTIFIER_DINGTALK_TOKEN": "x"}, "unknown environment variable(s) "),
    ],
)
def test_bad_options_are_refused_with_what_is_wanted(args, env, message):
    result = run_notifier(*args, env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_a_busy_port_is_said_plainly():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_notifier("--host", "127.0.0.1", "--port", str(port))
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_dead_mans_switch_says_broken_before_recovered_when_they_race():
    """A Watchdog that arrives while the alarm is being said (printed, queued) is said to have
    recovered after it, never before: the last word and the gauge stay right. The alarm's
    callback is held open while a Watchdog arrives on another thread."""
    from notifier.watchdog import DeadMansSwitch

    now = [0.0]
    said: list[str] = []
    saying_broken, go_on = threading.Event(), threading.Event()

    def on_event(kind: str, _text: str) -> None:
        if kind == "broken":
            saying_broken.set()
            assert go_on.wait(10)
        said.append(kind)

    switch = DeadMansSwitch(3.0, on_event, clock=lambda: now[0])
    switch.received()  # "ok": the first Watchdog
    now[0] = 10.0  # then none for 10 s: the alarm is due
    alarm = threading.Thread(target=switch.check)
    alarm.start()
    assert saying_broken.wait(10)
    watchdog = threading.Thread(target=switch.received)  # a Watchdog arrives meanwhile
    watchdog.start()
    watchdog.join(0.5)  # it says nothing until the alarm has been said
    go_on.set()
    alarm.join(10)
    watchdog.join(10)
    assert said == ["ok", "broken", "recovered"]
    assert switch.state == "ok"


def test_a_stdout_nobody_reads_holds_up_neither_the_webhooks_nor_the_relays(robots, tmp_path):
    """stdout a pipe that is never read (a reader that stopped, a paused `| less`): once it is
    full, the notifications still reach the relay, /alerts and /health still answer, the lines
    that could not be printed are dropped and counted, and SIGTERM still ends the notifier."""
    feishu = robots("feishu")
    environment = {k: v for k, v in os.environ.items() if not k.startswith("VIGIL_NOTIFIER_")}
    environment.update(relay_env(None, feishu))
    with open(tmp_path / "notifier.err", "wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "notifier", "--host", "127.0.0.1", "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=err,
            cwd=REPO,
            env=environment,
        )
    try:
        listening = process.stdout.readline().decode()  # then stdout is never read again
        base_url = f"http://{LISTENING.search(listening).group(1)}"
        # 10 notifications of 200 alerts: 2,000 lines of about 300 bytes, far more than a
        # pipe's buffer (64 KiB) and the console's queue hold.
        for n in range(10):
            storm = [
                alert(f"Storm{n}Alert{i:03d}", summary="Engine stalled; " * 10) for i in range(200)
            ]
            response = requests.post(base_url + "/alerts", json=payload(*storm), timeout=10)
            assert response.status_code == 200, response.text
            assert requests.get(base_url + "/health", timeout=10).status_code == 200
        wait_until(
            lambda: all(
                any(f"Storm{n}Alert000" in text for text in feishu.texts()) for n in range(10)
            ),
            60,
            "every notification at the relay",
        )
        metrics = requests.get(base_url + "/metrics", timeout=10).text
        (dropped,) = re.findall(
            r"^vigil_notifier_console_lines_dropped_total (\S+)$", metrics, re.M
        )
        assert float(dropped) > 0
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            returncode = process.wait(30)
        finally:
            process.kill()
            process.stdout.close()
    log = (tmp_path / "notifier.err").read_text()
    assert returncode == 0, log[-3000:]
    assert "Traceback" not in log
    assert log.count("console lines are being dropped") == 1, log[-3000:]


@pytest.mark.skipif(
    shutil.which("amtool") is None,
    reason="amtool is not installed (Debian package prometheus-alertmanager)",
)
@pytest.mark.parametrize(
    ("severity", "robots_named"),
    [("critical", ["dingtalk", "feishu"]), ("warning", ["feishu"]), ("info", ["feishu"])],
)
def test_the_examples_send_each_alert_to_the_notifier_once(severity, robots_named):
    """The notifier prints every notification it receives: one webhook per alert, naming
    every robot it should reach (amtool says which receivers Alertmanager picks)."""
    examples = ALERTS / "alertmanager.examples.yml"
    config = yaml.safe_load(examples.read_text())
    hooks = {
        receiver["name"]: [hook["url"] for hook in receiver.get("webhook_configs", [])]
        for receiver in config["receivers"]
    }
    result = subprocess.run(
        ["amtool", "config", "routes", "test", f"--config.file={examples}"]
        + [f"severity={severity}", "alertname=InferenceEngineStalled"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    chosen = result.stdout.strip().split(",")
    to_notifier = [url for name in chosen for url in hooks[name] if "127.0.0.1:5001" in url]
    assert len(to_notifier) == 1, (chosen, to_notifier)
    (url,) = to_notifier
    assert urlsplit(url).path == "/alerts"
    assert parse_qs(urlsplit(url).query)["relay"][0].split(",") == robots_named
