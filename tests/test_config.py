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
    assert config.header_timeout == 10.0 and config.max_connections is None
    assert config.max_messages_per_request == 4096


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


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    """The one line a start-up error prints on stderr (exit 2, nothing on stdout)."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m inference: error: "), lines
    return lines[0]


def test_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _run_main("--port", str(port), "--state-dir", str(tmp_path))
    line = _one_error_line(result)
    assert f"cannot listen on 127.0.0.1:{port}" in line
    assert "is another server using that port? choose another with --port" in line


@pytest.mark.parametrize(
    ("host", "words"),
    [
        # TEST-NET-1 (RFC 5737): an address no machine has.
        ("192.0.2.1", "this machine has no address 192.0.2.1"),
        # .invalid (RFC 2606) never resolves.
        ("no-such-host.invalid", "the name 'no-such-host.invalid' does not resolve"),
    ],
)
def test_a_host_this_machine_cannot_listen_on_says_so(tmp_path, host, words):
    line = _one_error_line(_run_main("--host", host, "--port", "0", "--state-dir", str(tmp_path)))
    assert f"cannot listen on {host}:0: {words}" in line
    assert "--host takes an address of this machine, e.g. 127.0.0.1 or 0.0.0.0" in line
    assert "another server" not in line


def test_a_connection_cap_over_the_descriptor_limit_stops_the_start(tmp_path):
    import resource

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

    result = subprocess.run(
        [sys.executable, "-m", "inference", "--max-connections", "5000", "--port", "0"]
        + ["--state-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        preexec_fn=low_limit,  # noqa: PLW1509 - one call, before exec
    )
    line = _one_error_line(result)
    assert "--max-connections 5000 needs 5384 file descriptors" in line
    assert "may open at most 1024 (ulimit -n); lower --max-connections to at most 640" in line


@pytest.mark.parametrize(
    ("requested", "soft", "hard", "planned"),
    [
        (None, 1024, 524288, (1000, 1384)),  # systemd's default: the soft limit raised
        (None, 1024, 1024, (640, 1024)),  # no room to raise: the default lowered
        (None, 1_048_576, 1_048_576, (1000, 1_048_576)),  # Docker's: nothing to do
        (50, 4096, 4096, (50, 4096)),
        (5000, 1024, 65536, (5000, 5384)),
    ],
)
def test_the_connection_cap_fits_under_the_descriptor_limit(requested, soft, hard, planned):
    from inference.http.connections import plan_connections

    assert plan_connections(requested, soft, hard) == planned


def test_the_connection_cap_is_refused_where_it_cannot_fit():
    import resource

    from inference.http.connections import plan_connections

    infinite = resource.RLIM_INFINITY
    assert plan_connections(None, infinite, infinite) == (1000, infinite)
    with pytest.raises(ConfigError, match="lower --max-connections to at most 3712"):
        plan_connections(5000, 1024, 4096)
    with pytest.raises(ConfigError, match="leaves no room for client connections"):
        plan_connections(None, 256, 256)


@pytest.mark.parametrize(
    ("argv", "environ", "words"),
    [
        (["--port", "abc"], {}, "--port: 'abc' is not valid (must be a TCP port from 0 to 65535)"),
        ([], {"VIGIL_INFERENCE_PORT": "abc"}, "must be a TCP port"),
        ([], {"VIGIL_INFERENCE_MAX_BATCH_SIZE": "x"}, "'x' is not valid (must be a positive"),
        ([], {"VIGIL_INFERENCE_STALL_TIMEOUT": "soon"}, "must be a positive number of seconds"),
        ([], {"VIGIL_INFERENCE_SEED": "1.5"}, "must be an integer"),
        (["--header-timeout", "0"], {}, "--header-timeout: '0' is not valid (must be a positive"),
        (["--max-connections", "many"], {}, "'many' is not valid (must be a positive integer)"),
        (["--max-messages-per-request", "-3"], {}, "must be a positive integer"),
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
