"""The log pipeline, from a process's output through Alloy's labels to the dashboards' LogQL.

Neither Alloy nor Loki runs here (no build of either in the package registries this project
reaches, and no Docker daemon), so both are stood in for, narrowly:
- compose/alloy/config.alloy is read with a small reader of Alloy's syntax, and its
  ``loki.process "level"`` pipeline is run by an emulator of the stages it uses: stage.match
  (stream matchers only), stage.json (top-level keys), stage.logfmt, stage.template (``if``,
  ``else``, ``end``, ``.Field``, ``ToLower``) and stage.labels, written from Alloy's reference
  (https://grafana.com/docs/alloy/latest/reference/components/loki/loki.process/) and its
  source (internal/component/loki/process/stages: json.go, template.go, labels.go, util.go).
  Any other stage, matcher or template construct fails the test instead of being guessed.
- the dashboards' LogQL is run by an evaluator of the subset they use: stream selector, line
  filters, ``| json`` and label filters, ``sum by (label) (rate(...))``, written from Loki's
  log-query reference (https://grafana.com/docs/loki/latest/query/log_queries/: a line that
  does not parse keeps going with an ``__error__`` label; arrays are skipped; nested keys are
  joined with ``_``; a key that is already a stream label gets ``_extracted``) and Loki's
  pkg/logql/log/label_filter.go (a string filter compares a missing label as ""; a numeric one
  drops a line without the label and lets a line that already has an error through).

Both are fed real output: a real server's JSON lines, a real faulthandler dump from a server
that crashed, a real stall, real slow, failed and rejected requests.
"""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import start_server

from dashboards.generate import SLOW_REQUEST_S, boards

REPO = Path(__file__).resolve().parents[1]
ALLOY_CONFIG = REPO / "compose" / "alloy" / "config.alloy"

# ---- a reader of Alloy's configuration syntax ----------------------------------------------


@dataclass
class Block:
    kind: str  # e.g. loki.process, stage.match
    label: str | None
    attrs: dict[str, Any] = field(default_factory=dict)
    blocks: list[Block] = field(default_factory=list)


_ALLOY_TOKEN = re.compile(
    r"""(?P<skip>\s+|//[^\n]*|/\*.*?\*/)
    |(?P<string>"(?:[^"\\\n]|\\.)*")
    |(?P<raw>`[^`]*`)
    |(?P<number>-?\d+(?:\.\d+)?)
    |(?P<ident>[A-Za-z_][A-Za-z0-9_.]*)
    |(?P<punct>[{}\[\]=,()])""",
    re.X | re.S,
)


def _alloy_tokens(text: str) -> list[tuple[str, str]]:
    tokens, at = [], 0
    while at < len(text):
        match = _ALLOY_TOKEN.match(text, at)
        assert match, f"config.alloy: cannot read at {text[at : at + 40]!r}"
        at = match.end()
        if match.lastgroup != "skip":
            tokens.append((match.lastgroup, match.group()))
    return tokens


class _AlloyReader:
    def __init__(self, text: str):
        self.tokens = _alloy_tokens(text)
        self.at = 0

    def peek(self, ahead: int = 0) -> tuple[str, str]:
        index = self.at + ahead
        return self.tokens[index] if index < len(self.tokens) else ("end", "")

    def take(self, value: str | None = None) -> tuple[str, str]:
        token = self.peek()
        assert value is None or token[1] == value, f"expected {value!r}, found {token!r}"
        self.at += 1
        return token

    def body(self, closing: str | None) -> tuple[dict[str, Any], list[Block]]:
        attrs: dict[str, Any] = {}
        blocks: list[Block] = []
        while self.peek()[1] != (closing or "") and self.peek()[0] != "end":
            kind, name = self.take()
            assert kind == "ident", f"config.alloy: unexpected {name!r}"
            if self.peek()[1] == "=":
                self.take("=")
                attrs[name] = self.value()
                continue
            label = None
            if self.peek()[0] == "string":
                label = json.loads(self.take()[1])
            self.take("{")
            inner_attrs, inner_blocks = self.body("}")
            self.take("}")
            blocks.append(Block(name, label, inner_attrs, inner_blocks))
        return attrs, blocks

    def value(self) -> Any:
        kind, text = self.take()
        if kind == "string":
            return json.loads(text)
        if kind == "raw":
            return text[1:-1]
        if kind in ("number", "ident"):
            return text  # a number, true/false or a reference: kept as written
        if text == "[":
            items = []
            while self.peek()[1] != "]":
                items.append(self.value())
                if self.peek()[1] == ",":
                    self.take(",")
            self.take("]")
            return items
        if text == "{":
            mapping = {}
            while self.peek()[1] != "}":
                key_kind, key = self.take()
                mapping[json.loads(key) if key_kind == "string" else key] = (
                    self.take("=") and self.value()
                )
                if self.peek()[1] == ",":
                    self.take(",")
            self.take("}")
            return mapping
        raise AssertionError(f"config.alloy: unexpected value {text!r}")


def read_alloy(text: str) -> list[Block]:
    reader = _AlloyReader(text)
    attrs, blocks = reader.body(None)
    assert not attrs, f"config.alloy: top-level attributes {attrs}"
    return blocks


def component(blocks: list[Block], kind: str, label: str) -> Block:
    (found,) = [b for b in blocks if b.kind == kind and b.label == label]
    return found


# ---- an emulator of the loki.process stages the configuration uses -------------------------

_SELECTOR_MATCHER = re.compile(r'\s*([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*,?')


_LINE_FILTER = re.compile(r'\s*(\|=|!=|\|~|!~)\s*("(?:[^"\\]|\\.)*"|`[^`]*`)')


def parse_selector(selector: str) -> tuple[list[tuple[str, str, str]], list[tuple[str, str]]]:
    """A stage.match selector: its stream matchers, and its line filters (|=, !=, |~, !~)."""
    match = re.fullmatch(r"\s*\{([^}]*)\}(.*)", selector, re.S)
    assert match, f"cannot read the selector {selector!r}"
    inner, rest = match.groups()
    matchers, at = [], 0
    while at < len(inner.rstrip()):
        found = _SELECTOR_MATCHER.match(inner, at)
        assert found, f"cannot read the matchers of {selector!r}"
        name, op, value = found.groups()
        matchers.append((name, op, json.loads(f'"{value}"')))
        at = found.end()
    filters, at = [], 0
    while at < len(rest.rstrip()):
        found = _LINE_FILTER.match(rest, at)
        assert found, f"only line filters may follow the matchers: {rest[at:]!r}"
        op, text = found.groups()
        filters.append((op, text[1:-1] if text.startswith("`") else json.loads(text)))
        at = found.end()
    return matchers, filters


def line_passes(filters: list[tuple[str, str]], line: str) -> bool:
    """LogQL line filters: substrings, or RE2 regexes matched anywhere in the line."""
    for op, text in filters:
        found = (text in line) if op in ("|=", "!=") else re.search(text, line) is not None
        if found != (op in ("|=", "|~")):
            return False
    return True


def label_matches(op: str, pattern: str, value: str) -> bool:
    """A Prometheus/Loki label matcher; regexes are anchored at both ends."""
    if op == "=":
        return value == pattern
    if op == "!=":
        return value != pattern
    found = re.fullmatch(pattern, value) is not None
    return found if op == "=~" else not found


def go_string(value: Any) -> str:
    """Alloy's getString (stages/util.go): numbers, strings and booleans; anything else fails."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, (int, str)):
        return str(value)
    raise TypeError(f"can't convert {value!r} to string")


_TEMPLATE_ACTION = re.compile(r"\{\{(.*?)\}\}", re.S)


def go_template(template: str, data: dict[str, str]) -> str:
    """The subset of Go's text/template the configuration uses. A missing map key is Go's
    invalid value: false in ``if``, "<no value>" when printed."""
    parts = _TEMPLATE_ACTION.split(template)  # text, action, text, action, ...

    def value(expr: str) -> str | None:
        words = expr.split()
        if len(words) == 1 and words[0].startswith("."):
            return data.get(words[0][1:])
        if len(words) == 2 and words[0] in ("ToLower", "ToUpper") and words[1].startswith("."):
            arg = data.get(words[1][1:])
            if arg is None:  # Go fails the call with an invalid value: the stage skips the line
                raise ValueError("invalid value for " + words[0])
            return arg.lower() if words[0] == "ToLower" else arg.upper()
        raise NotImplementedError(f"template action {expr!r} is not emulated")

    def parse(index: int, stop: tuple[str, ...]) -> tuple[list, int, str]:
        nodes: list = []
        while index < len(parts):
            if index % 2 == 0:
                nodes.append(("text", parts[index]))
                index += 1
                continue
            action = parts[index].strip()
            index += 1
            if action.startswith("-") or action.endswith("-"):
                raise NotImplementedError("trim markers are not emulated")
            if action in stop:
                return nodes, index, action
            if action.startswith("if "):
                yes, index, ended = parse(index, ("else", "end"))
                no: list = []
                if ended == "else":
                    no, index, ended = parse(index, ("end",))
                assert ended == "end", f"unclosed if in {template!r}"
                nodes.append(("if", action[3:], yes, no))
            else:
                nodes.append(("print", action))
        assert not stop, f"unclosed action in {template!r}"
        return nodes, index, ""

    def execute(nodes: list) -> str:  # only the branch taken is evaluated, as in Go
        out = ""
        for node in nodes:
            if node[0] == "text":
                out += node[1]
            elif node[0] == "print":
                printed = value(node[1])
                out += "<no value>" if printed is None else printed
            else:
                out += execute(node[2] if value(node[1]) not in (None, "") else node[3])
        return out

    return execute(parse(0, ())[0])


def _logfmt(line: str) -> dict[str, str]:
    """key=value pairs (go-logfmt's reading: a key runs to '=' or a space; a value is bare or
    double-quoted; a bare key has an empty value)."""
    pairs = {}
    for match in re.finditer(r'([^\s="]+)(?:=("(?:[^"\\]|\\.)*"|[^\s"]*))?', line):
        key, raw = match.group(1), match.group(2) or ""
        pairs.setdefault(key, json.loads(raw) if raw.startswith('"') else raw)
    return pairs


STAGES = {"stage.match", "stage.json", "stage.logfmt", "stage.template", "stage.labels"}


def run_stage(stage: Block, labels: dict[str, str], extracted: dict[str, Any], line: str) -> None:
    kind, attrs = stage.kind, stage.attrs
    if kind == "stage.match":
        assert set(attrs) == {"selector"}, f"stage.match arguments {set(attrs)} not emulated"
        matchers, filters = parse_selector(attrs["selector"])
        if all(
            label_matches(op, value, labels.get(name, "")) for name, op, value in matchers
        ) and line_passes(filters, line):
            for inner in stage.blocks:
                run_stage(inner, labels, extracted, line)
    elif kind == "stage.json":
        assert set(attrs) == {"expressions"}, f"stage.json arguments {set(attrs)} not emulated"
        try:
            data = json.loads(line)
        except ValueError:
            return  # malformed: nothing extracted, the line goes on (drop_malformed is false)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            return  # Go's Unmarshal into a map fails on any other JSON value
        for name, expression in attrs["expressions"].items():
            key = expression or name
            assert re.fullmatch(r"[A-Za-z_]\w*", key), f"JMESPath {key!r} not emulated"
            found = data.get(key)
            if isinstance(found, (dict, list)):
                found = json.dumps(found, separators=(",", ":"))
            extracted[name] = found  # a missing key is extracted as nil, as JMESPath gives it
    elif kind == "stage.logfmt":
        assert set(attrs) == {"mapping"}, f"stage.logfmt arguments {set(attrs)} not emulated"
        pairs = _logfmt(line)
        for name, key in attrs["mapping"].items():
            if (key or name) in pairs:
                extracted[name] = pairs[key or name]
    elif kind == "stage.template":
        source = attrs["source"]
        data: dict[str, str] = {}
        for key, value in extracted.items():
            try:
                data[key] = go_string(value)
            except TypeError:
                continue
            if key == source:
                data["Value"] = data[key]
        data["Entry"] = line
        try:
            result = go_template(attrs["template"], data)
        except ValueError:
            return  # the template failed: the extracted map is left as it was
        if result == "":
            extracted.pop(source, None)
        else:
            extracted[source] = result
    elif kind == "stage.labels":
        for name, source in attrs["values"].items():
            if (source or name) in extracted:
                try:
                    labels[name] = go_string(extracted[source or name])
                except TypeError:
                    continue
    else:
        raise NotImplementedError(f"{kind} is not emulated")


def alloy_labels(service: str, line: str) -> dict[str, str]:
    """The labels Alloy sends with this line of this compose service's container."""
    process = component(read_alloy(ALLOY_CONFIG.read_text()), "loki.process", "level")
    labels: dict[str, str] = {"service": service}
    extracted: dict[str, Any] = {}
    for stage in process.blocks:
        run_stage(stage, labels, extracted, line)
    return labels


# ---- an evaluator of the LogQL the dashboards use ------------------------------------------

_LOGQL_TOKEN = re.compile(
    r"""\s*(?:(?P<string>"(?:[^"\\]|\\.)*"|`[^`]*`)
    |(?P<op>\|=|\|~|!=|!~|=~|==|>=|<=|=|>|<|\||,|\{|\})
    |(?P<number>\d+(?:\.\d+)?)
    |(?P<ident>[A-Za-z_]\w*))""",
    re.X,
)


def _logql_tokens(query: str) -> list[tuple[str, str]]:
    tokens, at = [], 0
    while query[at:].strip():
        match = _LOGQL_TOKEN.match(query, at)
        assert match, f"LogQL not evaluated here: {query[at:]!r}"
        kind = match.lastgroup
        text = match.group(kind)
        if kind == "string":
            text = text[1:-1] if text.startswith("`") else json.loads(text)
        tokens.append((kind, text))
        at = match.end()
    return tokens


@dataclass
class Entry:
    labels: dict[str, str]
    line: str


def _numeric(op: str, value: float, bound: float) -> bool:
    return {
        "==": value == bound,
        "=": value == bound,
        "!=": value != bound,
        ">": value > bound,
        ">=": value >= bound,
        "<": value < bound,
        "<=": value <= bound,
    }[op]


class _LogQuery:
    """A parsed log query: matchers, then stages run in order on each line."""

    def __init__(self, query: str):
        self.tokens = _logql_tokens(query)
        self.at = 0
        self.matchers = self._selector()
        self.stages = []
        while self.at < len(self.tokens):
            kind, op = self.tokens[self.at]
            self.at += 1
            if op in ("|=", "!=", "|~", "!~"):
                self.stages.append(("line", op, self._expect("string")))
            elif op == "|" and self.tokens[self.at] == ("ident", "json"):
                self.at += 1
                self.stages.append(("json",))
            elif op == "|":
                self.stages.append(("labels", self._label_filter()))
            else:
                raise AssertionError(f"LogQL not evaluated here: {op!r} in {query!r}")

    def _expect(self, kind: str) -> str:
        found, text = self.tokens[self.at]
        assert found == kind, f"expected a {kind}, found {text!r}"
        self.at += 1
        return text

    def _selector(self) -> list[tuple[str, str, str]]:
        assert self.tokens[self.at] == ("op", "{")
        self.at += 1
        matchers = []
        while self.tokens[self.at] != ("op", "}"):
            name = self._expect("ident")
            op = self.tokens[self.at][1]
            self.at += 1
            matchers.append((name, op, self._expect("string")))
            if self.tokens[self.at] == ("op", ","):
                self.at += 1
        self.at += 1
        # Loki refuses a selector whose every matcher matches the empty string.
        assert any(not label_matches(op, value, "") for _n, op, value in matchers), matchers
        return matchers

    def _label_filter(self) -> list:
        """Predicates joined by and/or, evaluated left to right (no parentheses here)."""
        chain: list = []
        while True:
            name = self._expect("ident")
            op = self.tokens[self.at][1]
            self.at += 1
            kind, value = self.tokens[self.at]
            self.at += 1
            if kind == "string":
                assert op in ("=", "!=", "=~", "!~"), op
                chain.append(("string", name, op, value))
            else:
                assert kind == "number", value
                chain.append(("number", name, op, float(value)))
            if self.at < len(self.tokens) and self.tokens[self.at] in (
                ("ident", "or"),
                ("ident", "and"),
                ("op", ","),
            ):
                chain.append("or" if self.tokens[self.at][1] == "or" else "and")
                self.at += 1
                continue
            return chain

    def run(self, entries: list[Entry]) -> list[Entry]:
        out = []
        for entry in entries:
            if not all(label_matches(op, v, entry.labels.get(n, "")) for n, op, v in self.matchers):
                continue
            found = self._pipeline(entry)
            if found is not None:
                out.append(found)
        return out

    def _pipeline(self, entry: Entry) -> Entry | None:
        labels = dict(entry.labels)
        for stage in self.stages:
            if stage[0] == "line":
                if not line_passes([stage[1:]], entry.line):
                    return None
            elif stage[0] == "json":
                _loki_json(entry.line, labels)
            elif not self._predicates(stage[1], labels):
                return None
        return Entry(labels, entry.line)

    @staticmethod
    def _predicate(predicate: tuple, labels: dict[str, str]) -> bool:
        kind, name, op, value = predicate
        if kind == "string":
            actual = labels.get(name, "")  # a missing label is the empty string
            return label_matches(op, value, actual)
        if "__error__" in labels:  # only a string filter can drop a line with an error
            return True
        if name not in labels:
            return False
        try:
            number = float(labels[name])
        except ValueError:
            labels["__error__"] = "LabelFilterErr"
            return True
        return _numeric(op, number, value)

    def _predicates(self, chain: list, labels: dict[str, str]) -> bool:
        result = self._predicate(chain[0], labels)
        for index in range(1, len(chain), 2):
            joiner, predicate = chain[index], chain[index + 1]
            if joiner == "or" and result:
                continue  # Loki's BinaryLabelFilter: an or whose left side holds stops there
            right = self._predicate(predicate, labels)
            result = (result or right) if joiner == "or" else (result and right)
        return result


def _loki_json(line: str, labels: dict[str, str]) -> None:
    """``| json`` without parameters: every key, nested ones joined with _, arrays skipped."""
    try:
        data = json.loads(line, parse_float=str, parse_int=str)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        labels["__error__"] = "JSONParserErr"
        return
    stream = set(labels)

    def add(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                add(f"{prefix}_{key}" if prefix else key, inner)
            return
        if isinstance(value, list):
            return
        key = re.sub(r"[^A-Za-z0-9_]", "_", prefix)
        if key in stream:
            key += "_extracted"
        if isinstance(value, bool):
            value = "true" if value else "false"
        labels.setdefault(key, "" if value is None else str(value))

    add("", data)


_METRIC = re.compile(r"sum by \((\w+)\) \(rate\((.*) \[[^\]]+\]\)\)", re.S)


def logql(query: str, entries: list[Entry]) -> list[Entry] | Counter:
    """A log query's lines, or a ``sum by (label) (rate(...))`` query's lines per label value
    (the counts stand in for the rates: only which series exist is checked)."""
    metric = _METRIC.fullmatch(query.strip())
    if metric:
        label, inner = metric.groups()
        return Counter(entry.labels.get(label, "") for entry in _LogQuery(inner).run(entries))
    return _LogQuery(query).run(entries)


# ---- the dashboards' Loki queries -----------------------------------------------------------


def loki_panels() -> dict[tuple[str, str], str]:
    """(board, panel title) -> its Loki query, for every Loki panel."""
    found = {}
    for name, board in boards().items():
        for panel in board["panels"]:
            for target in panel["targets"]:
                if target["datasource"]["type"] == "loki":
                    found[(name, panel["title"])] = target["expr"]
    return found


def level_variable() -> dict:
    logs_board = boards()["logs.json"]
    (variable,) = [v for v in logs_board["templating"]["list"] if v["name"] == "level"]
    return variable


def lines_query(service: str = ".+", level: str | None = None, request_id: str = "", trace_id=""):
    """The Logs board's Lines query with its variables filled in as Grafana does (None: All)."""
    expr = loki_panels()[("logs.json", "Lines")]
    values = {
        "$service": service,
        "$level": level_variable()["allValue"] if level is None else level,
        "$request_id": request_id,
        "$trace_id": trace_id,
    }
    for variable, value in values.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, expr
    return expr


def through_alloy(service: str, text: str) -> list[Entry]:
    """Every line of a container's output as Loki stores it (a blank line is left out)."""
    return [
        Entry(alloy_labels(service, raw), raw) for raw in text.splitlines() if raw.strip() != ""
    ]


# ---- the emulators themselves ---------------------------------------------------------------


def test_the_emulators_read_what_they_are_given():
    blocks = read_alloy('a "x" {\n  b = `{s=~"p|q"}` // c\n  d { e = { f = "" } }\n}\n')
    assert blocks == [Block("a", "x", {"b": '{s=~"p|q"}'}, [Block("d", None, {"e": {"f": ""}})])]
    assert parse_selector('{s=~"a|b", t!="c"} |~ "^\\\\d+ " != `x`') == (
        [("s", "=~", "a|b"), ("t", "!=", "c")],
        [("|~", "^\\d+ "), ("!=", "x")],
    )
    assert line_passes([("|~", "^\\d+ "), ("!=", "x")], "12 ab")
    assert not line_passes([("|~", "^\\d+ "), ("!=", "x")], "12 x")
    assert go_template("{{ if .Value }}{{ ToLower .Value }}{{ else }}x{{ end }}", {}) == "x"
    assert go_template("{{ if .Value }}{{ ToLower .Value }}{{ end }}", {"Value": "INFO"}) == "info"
    assert _logfmt('ts=1 level=warn msg="a b" bare') == {
        "ts": "1",
        "level": "warn",
        "msg": "a b",
        "bare": "",
    }
    entries = [
        Entry({"service": "s"}, '{"a": {"b": 1}, "c": [1], "level": "X", "n": 12}'),
        Entry({"service": "s"}, "not json"),
    ]
    parsed = logql('{service="s"} | json', entries)
    assert parsed[0].labels == {"service": "s", "a_b": "1", "level": "X", "n": "12"}
    assert parsed[1].labels["__error__"] == "JSONParserErr"
    # A numeric filter lets a line with an error through; a string one compares "" for a
    # missing label.
    assert len(logql('{service="s"} | json | n > 100', entries)) == 1
    assert len(logql('{service="s"} | json | a_b = "1" | n > 100 or n < 20', entries)) == 1
    assert len(logql('{service="s"} | json | nothing =~ ".*"', entries)) == 2
    assert logql('sum by (service) (rate({service="s"} [1m]))', entries) == {"s": 2}
    with pytest.raises(AssertionError):
        logql('{service=~".*"}', entries)  # Loki refuses a selector that matches everything


def test_the_alloy_configuration_uses_only_emulated_stages_and_ships_what_it_labels():
    blocks = read_alloy(ALLOY_CONFIG.read_text())
    process = component(blocks, "loki.process", "level")
    source = component(blocks, "loki.source.docker", "compose")
    assert source.attrs["forward_to"] == ["loki.process.level.receiver"]
    assert process.attrs["forward_to"] == ["loki.write.local.receiver"]

    def kinds(stages: list[Block]) -> set[str]:
        return {s.kind for s in stages} | {k for s in stages for k in kinds(s.blocks)}

    assert kinds(process.blocks) <= STAGES, kinds(process.blocks) - STAGES
    # The labels stage comes last: every stage that decides the level runs before it.
    assert process.blocks[-1].kind == "stage.labels"
    assert process.blocks[-1].attrs["values"] == {"level": ""}


# ---- every line gets a level ----------------------------------------------------------------

FAULTHANDLER = """Fatal Python error: Segmentation fault

Thread 0x00007f3a1c7fe6c0 (most recent call first):
  File "/app/inference/engine/engine.py", line 412 in _decode_step

Current thread's C stack trace (most recent call first):
  Binary file "/usr/local/bin/python3.11", at _Py_DumpStack+0x4c [0x5634]

Extension modules: numpy._core._multiarray_umath, torch._C (total: 42)"""
TRACEBACK = """Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
ModuleNotFoundError: No module named 'transformers'"""
NATIVE = "terminate called after throwing an instance of 'c10::Error'"
OURS = {
    '{"timestamp": "t", "level": "INFO", "message": "request finished"}': "info",
    '{"timestamp": "t", "level": "WARNING", "message": "request rejected: x"}': "warning",
    '{"timestamp": "t", "level": "ERROR", "message": "stall report: ..."}': "error",
    '{"timestamp": "t", "level": "SUCCESS", "message": "ok"}': "success",
    # JSON without a level did not come from the logger either
    '{"timestamp": "t", "message": "no level"}': "error",
    # the head and the tail of a line over 16 KiB, split by Docker
    '{"timestamp": "t", "level": "ERROR", "message": "stall report: the engine made no': "error",
    'progress", "threads": [{"thread": "engine"}]}': "error",
    "[1, 2]": "error",
    "null": "error",
}


@pytest.mark.parametrize("service", ["inference", "exporter", "notifier"])
def test_our_processes_lines_keep_their_level_and_anything_else_is_an_error(service):
    for line, level in OURS.items():
        assert alloy_labels(service, line) == {"service": service, "level": level}, line
    for text in (FAULTHANDLER, TRACEBACK, NATIVE):
        for line in text.splitlines():
            if line.strip():
                assert alloy_labels(service, line)["level"] == "error", line


def test_the_notifiers_console_line_is_info():
    """Its stdout line for a person (notifier/console.py), beside the JSON line on stderr."""
    from notifier.console import Console

    printed = io.StringIO()
    Console(printed).print("FIRING [critical] InferenceEngineStalled instance=a model=demo: x")
    (line,) = printed.getvalue().splitlines()
    assert alloy_labels("notifier", line) == {"service": "notifier", "level": "info"}
    for other in ("inference", "exporter"):  # the exception is the notifier's alone
        assert alloy_labels(other, line)["level"] == "error"
    assert alloy_labels("notifier", "Traceback (most recent call last):")["level"] == "error"


def test_the_notifiers_console_lines_of_a_failure_are_errors():
    """A relay that gave up, the alerting pipeline broken: error, as their JSON copies are."""
    from notifier.console import Console

    printed = io.StringIO()
    console = Console(printed)
    console.print("RELAY FAILED: dingtalk did not take FIRING X (1 alert) after 8 attempts")
    console.print("ALERTING PIPELINE BROKEN: no Watchdog from Alertmanager in 180 s")
    console.print("alerting pipeline recovered: Watchdog received from Alertmanager")
    failed, broken, recovered = printed.getvalue().splitlines()
    assert alloy_labels("notifier", failed)["level"] == "error"
    assert alloy_labels("notifier", broken)["level"] == "error"
    assert alloy_labels("notifier", recovered)["level"] == "info"


@pytest.mark.parametrize(
    "service, line, level",
    [
        ("grafana", 'logger=server t=2026-01-01T00:00:00Z level=warn msg="x y"', "warn"),
        ("prometheus", "time=2026-01-01T00:00:00Z level=INFO source=main.go:1 msg=x", "info"),
        ("loki", "level=error ts=2026-01-01T00:00:00Z caller=x.go:1 msg=boom", "error"),
        ("alertmanager", 'ts=2026-01-01T00:00:00Z caller=main.go:1 level=debug msg="x"', "debug"),
        (
            "loki",
            "panic: runtime error: invalid memory address or nil pointer dereference",
            "unknown",
        ),
        ("tempo", "goroutine 1 [running]:", "unknown"),
        ("vllm", "INFO 01-01 00:00:00 [api_server.py:1] Starting vLLM API server", "unknown"),
        ("sglang", "[2026-01-01 00:00:00] server started", "unknown"),
    ],
)
def test_other_services_lines_get_their_own_level_or_unknown(service, line, level):
    assert alloy_labels(service, line) == {"service": service, "level": level}


def test_the_level_variable_offers_every_level_alloy_gives_and_all_is_every_line():
    variable = level_variable()
    offered = variable["query"].split(",")
    assert {"error", "unknown", "warning", "warn", "info"} <= set(offered)
    given = {level for level in OURS.values()} | {"unknown", "warn", "debug"}
    assert given <= set(offered), given - set(offered)
    assert variable["includeAll"]
    # All matches a line without a level label too (lines shipped by another agent, or before
    # this configuration): Loki compares an absent label as the empty string.
    for level in ["", *offered]:
        assert label_matches("=~", variable["allValue"], level), level


# ---- real output: a crash ---------------------------------------------------------------------


def test_a_crash_stack_is_found_under_all_and_under_error(tmp_path, demo_dir):
    server = start_server(tmp_path, demo_dir, "--enable-fault-injection")
    try:
        requests.post(
            server.url("/v1/completions"),
            json={"model": "demo", "prompt": "before", "max_tokens": 2},
            timeout=60,
        ).raise_for_status()
        requests.post(
            server.url("/debug/fault"), json={"fault": "crash", "stage": "decode"}, timeout=10
        ).raise_for_status()
        with pytest.raises(requests.ConnectionError):
            requests.post(
                server.url("/v1/completions"),
                json={"model": "demo", "prompt": "crash", "max_tokens": 8, "ignore_eos": True},
                timeout=60,
            )
        assert server.process.wait(timeout=30) == -11
    finally:
        server.stop()
    text = server.log_path.read_text(errors="replace")
    entries = through_alloy("inference", text)
    dump = [e for e in entries if not e.line.lstrip().startswith("{")]
    assert any("Fatal Python error: Segmentation fault" in e.line for e in dump)
    assert any("_decode_step" in e.line for e in dump)
    assert all(e.labels["level"] == "error" for e in dump)

    every = logql(lines_query(), entries)
    assert [e.line for e in every] == [e.line for e in entries]  # All: every line
    errors = logql(lines_query(service="inference", level="error"), entries)
    assert {e.line for e in dump} <= {e.line for e in errors}
    assert not {e.line for e in dump} & {e.line for e in logql(lines_query(level="info"), entries)}
    by_level = logql(
        loki_panels()[("logs.json", "Log lines by level")]
        .replace("$service", ".+")
        .replace("$level", level_variable()["allValue"])
        .replace("$__rate_interval", "1m"),
        entries,
    )
    assert by_level["error"] >= len(dump) and by_level["info"] >= 1


# ---- real output: a stall, and slow, failed and rejected requests ---------------------------


def _post(server, request_id: str, **body) -> requests.Response:
    return requests.post(
        server.url("/v1/completions"),
        json={"model": "demo", "prompt": request_id, "max_tokens": 4, **body},
        headers={"X-Request-Id": request_id},
        timeout=120,
    )


def _arm(server, **fault) -> None:
    requests.post(server.url("/debug/fault"), json=fault, timeout=10).raise_for_status()


def test_a_stalled_request_and_the_slow_or_failed_ones_are_found_by_the_dashboards(
    tmp_path, demo_dir
):
    server = start_server(
        tmp_path,
        demo_dir,
        "--enable-fault-injection",
        "--stall-timeout",
        "2",
        "--on-stall",
        "report",
    )
    try:
        assert _post(server, "fast-1").status_code == 200
        assert _post(server, "bad-1", max_tokens=-1).status_code == 400
        _arm(server, fault="slow", stage="decode", seconds=1.0, steps=1)
        assert _post(server, "slow-1").status_code == 200
        _arm(server, fault="hang", stage="decode", seconds=6)
        stalled = _post(server, "stalled-1", max_tokens=20, ignore_eos=True)
        assert stalled.status_code == 503, stalled.text
        trace_id = stalled.headers["x-trace-id"]
        server.wait_for(
            lambda: any("moves again" in line["message"] for line in server.logs()),
            timeout=30,
            what="the engine to move again",
        )
    finally:
        server.stop()
    entries = through_alloy("inference", server.log_path.read_text())
    assert len(entries) == len(server.logs())  # every line is JSON

    # Following the stalled request by its id or its trace id finds its stall line.
    by_id = logql(lines_query(request_id="stalled-1"), entries)
    events = {e.labels.get("event") for e in by_id}
    assert {"stalled_request", "request_end"} <= events, events
    (stall_line,) = [e for e in by_id if e.labels.get("event") == "stalled_request"]
    assert stall_line.labels["trace_id"] == trace_id
    assert stall_line.labels["level"] == "error"  # Alloy's label
    assert stall_line.labels["request_stage"] == "decode" and stall_line.labels["stage"] == "decode"
    by_trace = logql(lines_query(trace_id=trace_id), entries)
    assert stall_line.line in {e.line for e in by_trace}
    assert {e.labels.get("request_id") for e in by_trace} == {"stalled-1"}
    under_error = logql(lines_query(level="error", request_id="stalled-1"), entries)
    assert stall_line.line in {e.line for e in under_error}

    # The Hang forensics board: the report and the stalled request's line.
    stall_panel = logql(
        loki_panels()[("hang-forensics.json", "Stall reports and stalled requests")], entries
    )
    report, per_request = stall_panel
    assert (
        report.labels["message"].startswith("stall report") and report.labels["stage"] == "decode"
    )
    assert report.labels["request_id"] == ""  # its requests array is skipped by | json
    assert per_request.line == stall_line.line

    # Slow or failed: one filter finds the 5xx, and a slow one (the threshold lowered to this
    # test's one-second step, the query otherwise as committed); never a fast or rejected one.
    slow_or_failed = loki_panels()[("hang-forensics.json", "Slow or failed requests")]
    found = {e.labels["request_id"] for e in logql(slow_or_failed, entries)}
    assert found == {"stalled-1"}
    threshold = f"duration_s > {SLOW_REQUEST_S}"
    assert threshold in slow_or_failed
    lowered = slow_or_failed.replace(threshold, "duration_s > 0.9")
    found = {e.labels["request_id"]: e for e in logql(lowered, entries)}
    assert set(found) == {"slow-1", "stalled-1"}
    assert found["slow-1"].labels["outcome"] == "finished"
    assert found["stalled-1"].labels["outcome"] == "failed"
    assert found["stalled-1"].labels["message"].startswith("request failed: ")
