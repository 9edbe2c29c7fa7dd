"""The typed configuration: command line over environment over defaults, bad values named."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from conftest import REPO

from inference.config import OPTIONS, Config, ConfigError, load_config


def test_defaults():
    config = load_config([], environ={})
    assert config.model == "demo" and config.port == 8000 and config.host == "127.0.0.1"
    assert config.max_batch_size == 8 and config.request_timeout == 120.0
    assert config.model_name == "demo"


def test_environment_and_command_line():
    env = {
        "VIGIL_INFERENCE_PORT": "9001",
        "VIGIL_INFERENCE_MAX_QUEUE": "3",
        "VIGIL_INFERENCE_TRUST_REMOTE_CODE": "true",
        "VIGIL_INFERENCE_MODEL": "/models/glm-4",
    }
    config = load_config(["--port", "9002"], environ=env)
    assert config.port == 9002  # the command line wins
    assert config.max_queue == 3 and config.trust_remote_code is True
    assert config.model_name == "glm-4"
    assert load_config(["--trust-remote-code", "--seed", "7"], environ={}).seed == 7


@pytest.mark.parametrize(
    "argv,env,words",
    [
        (["--port", "99999"], {}, "--port: '99999' is not valid (must be a TCP port"),
        (["--max-batch-size", "0"], {}, "--max-batch-size: '0' is not valid (must be a positive"),
        (["--request-timeout", "soon"], {}, "--request-timeout: 'soon' is not valid"),
        (["--device", "tpu"], {}, "must be auto, cpu, cuda or cuda:N"),
        ([], {"VIGIL_INFERENCE_MAX_QUEUE": "-1"}, "VIGIL_INFERENCE_MAX_QUEUE: '-1' is not valid"),
        ([], {"VIGIL_INFERENCE_DTYPE": "float8"}, "VIGIL_INFERENCE_DTYPE: 'float8' is not one of"),
        ([], {"VIGIL_INFERENCE_LOG_PROMPTS": "maybe"}, "must be true or false"),
        (
            [],
            {"VIGIL_INFERENCE_MAX_BATCH": "4"},
            "unknown environment variable(s) VIGIL_INFERENCE_MAX_BATCH",
        ),
    ],
)
def test_bad_values_are_rejected_with_their_name(argv, env, words):
    with pytest.raises(ConfigError) as caught:
        load_config(argv, environ=env)
    assert words in str(caught.value)


def test_every_option_is_documented_in_the_readme():
    from exporter.config import OPTIONS as EXPORTER_OPTIONS

    readme = (REPO / "README.md").read_text()
    for option in OPTIONS + EXPORTER_OPTIONS:
        assert f"`{option.flag}`" in readme, option.flag
        assert f"`{option.env}`" in readme, option.env


def test_config_fields_and_options_agree():
    assert [o.name for o in OPTIONS] == list(Config.__dataclass_fields__)


def _run_main(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "inference", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def test_bad_option_exits_2_with_a_message():
    result = _run_main("--max-queue", "lots")
    assert result.returncode == 2
    assert "--max-queue: 'lots' is not valid" in result.stderr


def test_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _run_main("--port", str(port), "--state-dir", str(tmp_path))
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("argv", "environ", "words"),
    [
        (["--port", "abc"], {}, "--port: 'abc' is not valid (must be a TCP port from 0 to 65535)"),
        ([], {"VIGIL_INFERENCE_PORT": "abc"}, "must be a TCP port"),
        ([], {"VIGIL_INFERENCE_MAX_BATCH_SIZE": "x"}, "'x' is not valid (must be a positive"),
        ([], {"VIGIL_INFERENCE_STALL_TIMEOUT": "soon"}, "must be a positive number of seconds"),
        ([], {"VIGIL_INFERENCE_SEED": "1.5"}, "must be an integer"),
    ],
)
def test_bad_values_say_what_is_wanted_never_a_type_name(argv, environ, words):
    with pytest.raises(ConfigError) as caught:
        load_config(argv, environ=environ)
    message = str(caught.value)
    assert words in message
    assert "positive_int" not in message and "expected port" not in message


def test_the_doctors_help_into_a_closed_pipe_ends_without_a_traceback():
    # `python -m inference doctor --help | head -1`: the reader leaves after one line.
    process = subprocess.Popen(
        [sys.executable, "-m", "inference", "doctor", "--help"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
        bufsize=0,
    )
    first = process.stdout.read(6)
    process.stdout.close()
    _, stderr = process.communicate(timeout=120)
    assert first == b"usage:"
    assert b"Traceback" not in stderr and b"BrokenPipe" not in stderr, stderr.decode()
    assert process.returncode in (0, 141)  # 0 if all of it fitted in the pipe before
