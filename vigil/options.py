"""Typed options for a process: each declared once, read from flags over environment over defaults.

A process lists its ``Option``s and a frozen dataclass with the same fields and their defaults;
``OptionSet`` builds the argparse parser, reads ``<PREFIX><NAME>`` variables, converts and
checks every value, and rejects unknown ``<PREFIX>*`` variables with a message that names them.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the option."""


def _number(text: str, kind: type, expected: str):
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"must be {expected}") from None


def positive_int(text: str) -> int:
    value = _number(text, int, "a positive integer")
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float, "a positive number of seconds")
    if not value > 0 or value == float("inf"):
        raise ValueError("must be a positive number of seconds")
    return value


def port(text: str) -> int:
    value = _number(text, int, "a TCP port from 0 to 65535")
    if not 0 <= value <= 65535:
        raise ValueError("must be a TCP port from 0 to 65535")
    return value


def boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be true or false")


def optional_str(text: str) -> str | None:
    return text or None


def optional_positive_int(text: str) -> int | None:
    return positive_int(text) if text else None


def optional_int(text: str) -> int | None:
    return _number(text, int, "an integer") if text else None


@dataclass(frozen=True)
class Option:
    """One option: how it is spelled on the command line and in the environment."""

    name: str  # attribute name on the configuration dataclass
    type: Callable[[str], Any]
    help: str
    metavar: str | None = None
    choices: Sequence[str] | None = None
    flag_only: bool = False  # a boolean switch: ``--flag`` sets it
    multiple: bool = False  # the flag may repeat; the variable holds a comma-separated list
    # How a value that is refused is shown in the error: by default whole (repr); an option
    # that carries a credential (a webhook URL with its token, a secret) shows only what is
    # safe to print, so that a typo never puts the credential in a log.
    show: Callable[[str], str] = repr
    prefix: str = ""  # set by OptionSet

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return self.prefix + self.name.upper()


class OptionSet:
    """The options of one process and the dataclass they fill."""

    def __init__(
        self, prefix: str, options: Sequence[Option], config_cls: type, prog: str, description: str
    ):
        self.prefix = prefix
        self.options = tuple(replace(o, prefix=prefix) for o in options)
        self.config_cls = config_cls
        self.prog = prog
        self.description = description
        names = [f.name for f in fields(config_cls)]
        assert names == [o.name for o in self.options], (
            f"the options and {config_cls.__name__} must list the same names in the same order"
        )

    def build_parser(self) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(
            prog=self.prog,
            description=f"{self.description} Every option can also be set by an environment "
            f"variable: {self.prefix}<OPTION> (for example {self.options[0].env}).",
        )
        for option in self.options:
            help_text = f"{option.help} [env {option.env}]"
            if option.flag_only:
                parser.add_argument(
                    option.flag,
                    dest=option.name,
                    action="store_const",
                    const="true",
                    default=None,
                    help=help_text,
                )
            else:
                parser.add_argument(
                    option.flag,
                    dest=option.name,
                    default=None,
                    metavar=option.metavar,
                    choices=option.choices,
                    action="append" if option.multiple else "store",
                    help=help_text,
                )
        return parser

    def load(
        self, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
    ) -> Any:
        """The configuration from the command line over the environment over the defaults.

        Raises ConfigError naming the flag or variable that is wrong; argparse itself exits with
        status 2 on an unknown flag, as command-line tools do.
        """
        environ = os.environ if environ is None else environ
        known_env = {o.env for o in self.options}
        unknown = sorted(k for k in environ if k.startswith(self.prefix) and k not in known_env)
        if unknown:
            raise ConfigError(
                f"unknown environment variable(s) {', '.join(unknown)}; known ones are "
                f"{', '.join(sorted(known_env))}"
            )
        args = self.build_parser().parse_args(argv)
        values: dict[str, Any] = {}
        for option in self.options:
            cli_value = getattr(args, option.name)
            if cli_value is not None:
                values[option.name] = _convert_all(option, cli_value, option.flag)
            elif option.env in environ:
                raw = environ[option.env]
                if option.multiple:
                    raw = [item for item in re.split(r"[,\s]+", raw) if item]
                values[option.name] = _convert_all(option, raw, option.env)
        return self.config_cls(**values)


def _convert_all(option: Option, raw: Any, source: str) -> Any:
    if option.multiple:
        return tuple(_convert(option, item, source) for item in raw)
    return _convert(option, raw, source)


def _convert(option: Option, raw: str, source: str) -> Any:
    if option.choices is not None and raw not in option.choices:
        raise ConfigError(f"{source}: {option.show(raw)} is not one of {', '.join(option.choices)}")
    try:
        return option.type(raw)
    except ValueError as exc:
        # Converters say what they want ("must be ..."); anything else is said plainly, never
        # with a function's name.
        reason = str(exc) if "must" in str(exc) else f"not a valid value for {source}"
        raise ConfigError(f"{source}: {option.show(raw)} is not valid ({reason})") from None


def hidden(_text: str) -> str:
    """``Option.show`` for a secret: the value is never shown."""
    return "(the value, not shown)"


def url_origin(text: str) -> str:
    """``Option.show`` for a URL that may carry a credential in its path or query (a chat
    robot's webhook): at most its scheme and host, the rest as "…"; never its user, password,
    path or query. A value that does not start like a URL (it may be the credential itself) is
    not shown at all."""
    parts = re.match(r"(?:([A-Za-z][A-Za-z0-9+.-]*):)?(//)?([^/?#]*)(.*)", text, re.S)
    scheme, slashes, authority, rest = parts.groups()
    host = authority.rpartition("@")[2]  # never user:password@
    if not re.fullmatch(r"[A-Za-z0-9.-]+(:\d{1,5})?|\[[0-9A-Fa-f:.]+\](:\d{1,5})?", host):
        host = ""
    if scheme and slashes:
        if not host:
            return repr(f"{scheme}://…")
        return repr(f"{scheme}://{host}/…" if rest else f"{scheme}://{host}")
    if not scheme and not slashes and host and "." in host and rest:
        return repr(f"{host}/…")
    return "(a value that is not a URL, not shown)"
