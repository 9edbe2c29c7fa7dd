"""The environment doctor: `python -m inference doctor` run for real on broken and sound setups
(its GPU checks on a fake fleet, its host checks on a light install), the server's start-up
checks, and the GPU rules on the facts NVML and torch report."""

from __future__ import annotations

import http.server
import json
import math
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path

import pytest
import requests
from conftest import REPO

from inference.doctor import gpu, gpu_facts
from inference.doctor.report import Status
from vigil.gpu.backend import BackendUnavailable, GpuLost
from vigil.gpu.fake import FakeFleet
from vigil.gpu.nvml import NvmlBackend

NO_GPU = not __import__("torch").cuda.is_available()


def doctor(
    *args: str,
    env: dict[str, str] | None = None,
    prefix: tuple[str, ...] = (),
    timeout: float = 300,
    launcher: tuple[str, ...] = ("-m", "inference"),
) -> subprocess.CompletedProcess:
    child_env = {
        k: v for k, v in os.environ.items() if not k.startswith(("VIGIL_INFERENCE_", "OTEL_"))
    }
    child_env.update(env or {})
    return subprocess.run(
        [*prefix, sys.executable, *launcher, "doctor", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=child_env,
        timeout=timeout,
    )


def verdicts(result: subprocess.CompletedProcess) -> dict[str, dict]:
    document = json.loads(result.stdout)
    return {check["check"]: check for check in document["checks"]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- checkpoints with faults ---------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded_model(tmp_path_factory, demo_dir) -> Path:
    """The demo model saved in eight safetensors shards with an index, as hub checkpoints are."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inference.model.demo import ensure_demo_model

    source = ensure_demo_model(demo_dir)
    target = tmp_path_factory.mktemp("sharded")
    AutoModelForCausalLM.from_pretrained(source).save_pretrained(target, max_shard_size="2MB")
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    assert len(list(target.glob("model-*-of-*.safetensors"))) > 2
    return target


def copy_of(model: Path, tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(model, target)
    return target


def write_sparse_safetensors(path: Path, elements: int, dtype: str = "BF16") -> None:
    """A valid safetensors file holding one tensor of ``elements`` values, written sparse: the
    disk holds only the header however large the tensor."""
    itemsize = {"BF16": 2, "F32": 4}[dtype]
    header = json.dumps(
        {
            "model.embed_tokens.weight": {
                "dtype": dtype,
                "shape": [elements // 1024, 1024],
                "data_offsets": [0, elements // 1024 * 1024 * itemsize],
            }
        }
    ).encode()
    header += b" " * (-len(header) % 8)
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(header)) + header)
    os.truncate(path, 8 + len(header) + elements // 1024 * 1024 * itemsize)


def mem_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemTotal")


@pytest.fixture(scope="module")
def oversized_model(tmp_path_factory, demo_dir) -> Path:
    """The demo model's config and tokenizer with weights of twice this machine's RAM in
    bfloat16 (four times once loaded in float32 on the CPU)."""
    from inference.model.demo import ensure_demo_model

    target = tmp_path_factory.mktemp("oversized") / "model"
    shutil.copytree(ensure_demo_model(demo_dir), target)
    config = json.loads((target / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (target / "config.json").write_text(json.dumps(config))
    write_sparse_safetensors(target / "model.safetensors", mem_total())
    return target


# ---- the doctor on a sound machine ---------------------------------------------------------


def test_a_sound_cpu_setup_passes_every_check(tmp_path, demo_dir):
    port = free_port()
    result = doctor(
        "--json",
        "--demo-dir",
        demo_dir,
        "--port",
        str(port),
        "--state-dir",
        str(tmp_path / "state"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    document = json.loads(result.stdout)
    assert document["ok"] is True and document["counts"]["failed"] == 0
    found = verdicts(result)
    assert list(found) == [
        "python",
        "packages",
        "pip-check",
        "pynvml",
        "cuda-driver",
        "gpu-visibility",
        "compute-capability",
        "gpu-kernel",
        "model-source",
        "remote-code",
        "model-config",
        "tokenizer",
        "model-weights",
        "memory",
        "port",
        "state-dir",
        "otlp",
    ]
    for name in (
        "python",
        "packages",
        "pip-check",
        "pynvml",
        "model-source",
        "remote-code",
        "model-config",
        "tokenizer",
        "model-weights",
        "memory",
        "port",
        "state-dir",
    ):
        assert found[name]["status"] == "ok", found[name]
    import torch
    import transformers

    assert found["packages"]["values"]["versions"]["torch"] == torch.__version__
    assert found["packages"]["values"]["versions"]["transformers"] == transformers.__version__
    memory = found["memory"]["values"]
    assert memory["device"] == ("cpu" if NO_GPU else "cuda:0")
    assert 0 < memory["weights_bytes"] < memory["available_bytes"]
    assert memory["context_tokens"] == 2048
    assert memory["kv_cache_bytes"] == 2048 * 2 * 4 * 4 * 32 * 4  # layers, KV heads, dim, fp32
    assert found["port"]["values"]["port"] == port
    assert (tmp_path / "state").is_dir()
    assert found["otlp"]["status"] == "skipped"
    if NO_GPU:
        for name in ("cuda-driver", "gpu-visibility", "compute-capability", "gpu-kernel"):
            assert found[name]["status"] == "skipped", found[name]
    for check in found.values():
        assert (check["fix"] is None) == (check["status"] in ("ok", "skipped")), check


def test_the_text_report_has_a_line_per_check_and_a_tally(tmp_path, demo_dir):
    result = doctor(
        "--demo-dir",
        demo_dir,
        "--port",
        str(free_port()),
        "--state-dir",
        str(tmp_path / "state"),
        "--check",
        "model-weights",
        "--check",
        "port",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("python -m inference doctor: model 'demo'")
    assert [line.split()[:2] for line in lines[1:4]] == [
        ["ok", "model-source"],
        ["ok", "model-weights"],
        ["ok", "port"],
    ]
    assert "all present and whole" in lines[2]
    assert lines[-1] == "3 ok, 0 warning, 0 failed, 0 skipped"


def test_bad_options_are_refused_with_status_2():
    result = doctor("--port", "99999")
    assert result.returncode == 2
    assert "--port" in result.stderr and "Traceback" not in result.stderr
    result = doctor("--check", "no-such-check")
    assert result.returncode == 2 and "no-such-check" in result.stderr
    result = doctor("--fake-gpu-fleet", "/nonexistent/fleet.json")
    assert result.returncode == 2 and "/nonexistent/fleet.json" in result.stderr
    assert "Traceback" not in result.stderr


# ---- model files -----------------------------------------------------------------------------


def test_a_missing_shard_fails_and_names_the_file(tmp_path, sharded_model):
    model = copy_of(sharded_model, tmp_path)
    (model / "model-00003-of-00008.safetensors").unlink()
    result = doctor("--json", "--model", str(model), "--check", "memory")
    assert result.returncode == 1
    found = verdicts(result)
    weights = found["model-weights"]
    assert weights["status"] == "failed"
    assert weights["summary"] == (
        "1 of the 8 shards that model.safetensors.index.json names "
        "are missing: model-00003-of-00008.safetensors"
    )
    assert "download" in weights["fix"]
    assert found["memory"]["status"] == "skipped"
    assert found["model-config"]["status"] == "ok"


def test_a_truncated_shard_fails(tmp_path, sharded_model):
    model = copy_of(sharded_model, tmp_path)
    shard = model / "model-00005-of-00008.safetensors"
    os.truncate(shard, shard.stat().st_size - 4096)
    result = doctor("--json", "--model", str(model), "--check", "model-weights")
    found = verdicts(result)["model-weights"]
    assert result.returncode == 1 and found["status"] == "failed"
    assert "model-00005-of-00008.safetensors" in found["summary"]
    assert "truncated" in found["summary"]


def test_a_whole_sharded_checkpoint_passes(sharded_model):
    result = doctor("--json", "--model", str(sharded_model), "--check", "model-weights")
    found = verdicts(result)["model-weights"]
    assert result.returncode == 0 and found["status"] == "ok", found
    assert found["values"]["files"] == 8
    from safetensors import safe_open

    parameters = 0
    for shard in sharded_model.glob("*.safetensors"):
        with safe_open(shard, "pt") as handle:
            names = handle.keys()  # noqa: SIM118 - a safetensors file, not a dict
            parameters += sum(math.prod(handle.get_slice(k).get_shape()) for k in names)
    assert found["values"]["parameters"] == parameters


def test_a_missing_model_directory_fails(tmp_path):
    result = doctor("--json", "--model", str(tmp_path / "nowhere"), "--check", "memory")
    found = verdicts(result)
    assert result.returncode == 1
    assert found["model-source"]["status"] == "failed"
    assert "does not exist" in found["model-source"]["summary"]
    for name in ("model-config", "model-weights", "memory"):
        assert found[name]["status"] == "skipped"


def test_checkpoint_code_without_trust_remote_code_fails(tmp_path, demo_dir):
    from inference.model.demo import ensure_demo_model

    model = copy_of(ensure_demo_model(demo_dir), tmp_path)
    config = json.loads((model / "config.json").read_text())
    config.update(
        model_type="vigil_custom",
        auto_map={
            "AutoConfig": "configuration_custom.CustomConfig",
            "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM",
        },
    )
    (model / "config.json").write_text(json.dumps(config))
    result = doctor("--json", "--model", str(model), "--check", "remote-code")
    found = verdicts(result)["remote-code"]
    assert result.returncode == 1 and found["status"] == "failed"
    assert "'vigil_custom' needs the checkpoint's own code" in found["summary"]
    assert "--trust-remote-code" in found["fix"]
    trusted = verdicts(
        doctor("--json", "--model", str(model), "--check", "remote-code", "--trust-remote-code")
    )["remote-code"]
    assert trusted["status"] == "ok"


def test_weight_files_are_chosen_in_transformers_order(tmp_path, demo_dir):
    from inference.model.demo import ensure_demo_model

    model = copy_of(ensure_demo_model(demo_dir), tmp_path)
    # A stale index of pickles whose shards were never fetched: transformers loads
    # model.safetensors first and never reads it.
    (model / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "pytorch_model-00001-of-00002.bin"}})
    )
    found = verdicts(doctor("--json", "--model", str(model), "--check", "model-weights"))
    assert found["model-weights"]["status"] == "ok", found
    assert found["model-weights"]["summary"].startswith("model.safetensors, all present")


def test_an_index_naming_tensors_a_shard_lacks_only_warns(tmp_path, sharded_model):
    model = copy_of(sharded_model, tmp_path)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.rotary_emb.inv_freq"] = "model-00001-of-00008.safetensors"
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    found = verdicts(doctor("--json", "--model", str(model), "--check", "model-weights"))
    weights = found["model-weights"]
    assert weights["status"] == "warning", weights
    assert "model.rotary_emb.inv_freq in model-00001-of-00008.safetensors" in weights["summary"]


def _header_only(path: Path, header: dict, data_bytes: int) -> None:
    encoded = json.dumps(header).encode()
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)) + encoded + b"\0" * data_bytes)


def test_safetensors_headers_of_every_dtype_and_broken_ones(tmp_path):
    from inference.doctor.weights import WeightsError, read_weights

    _header_only(
        tmp_path / "model.safetensors",
        {
            "a": {"dtype": "F8_E4M3FNUZ", "shape": [4, 4], "data_offsets": [0, 16]},
            "b": {"dtype": "F4", "shape": [8], "data_offsets": [16, 20]},
            "c": {"dtype": "X9_FUTURE", "shape": [2], "data_offsets": [20, 24]},
            "__metadata__": {"format": "pt"},
        },
        24,
    )
    weights = read_weights(tmp_path)
    assert weights.bytes_as(2, 2) == 16 + 4  # FNUZ kept as 1 byte, F4 packed 2 per byte
    assert weights.notes == [
        "tensors of dtype X9_FUTURE, which this check cannot size, are left out of the size"
    ]
    _header_only(
        tmp_path / "model.safetensors",
        {"a": {"dtype": "F16", "shape": None, "data_offsets": [0, 8]}},
        8,
    )
    with pytest.raises(WeightsError, match="tensor 'a' is described wrongly"):
        read_weights(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x01")
    with pytest.raises(WeightsError, match="not a safetensors file"):
        read_weights(tmp_path)


def test_a_tied_output_layer_is_counted_once(tmp_path):
    from inference.doctor.weights import read_weights

    _header_only(
        tmp_path / "model.safetensors",
        {
            "model.embed_tokens.weight": {
                "dtype": "BF16",
                "shape": [10, 4],
                "data_offsets": [0, 80],
            },
            "lm_head.weight": {"dtype": "BF16", "shape": [10, 4], "data_offsets": [80, 160]},
        },
        160,
    )
    weights = read_weights(tmp_path)
    assert weights.bytes_as(4, 2) == 320 and weights.bytes_as(4, 2, tied=True) == 160


def _hub_cache_with(tmp_path: Path, model: Path, leave_out: str) -> Path:
    """The hub cache's layout (models--org--name/snapshots/<rev>, refs/main) holding a
    checkpoint whose download stopped before ``leave_out``."""
    repo = tmp_path / "hf" / "hub" / "models--example-org--tiny"
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / revision
    shutil.copytree(model, snapshot, ignore=shutil.ignore_patterns(leave_out))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return tmp_path / "hf"


def test_a_partial_snapshot_in_the_hub_cache_warns_and_does_not_stop_the_server(
    server_factory, sharded_model
):
    hf_home = _hub_cache_with(server_factory.tmp, sharded_model, "model-00004-of-00008.*")
    env = {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    found = verdicts(
        doctor("--json", "--model", "example-org/tiny", "--check", "model-weights", env=env)
    )
    assert found["model-source"]["status"] == "ok", found
    weights = found["model-weights"]
    assert weights["status"] == "warning", weights
    assert "cached snapshot of example-org/tiny is incomplete" in weights["summary"]
    # Offline, transformers cannot complete it either: the load fails, but in transformers,
    # after the start-up checks let it through.
    server = server_factory(model="example-org/tiny", ready=False, env=env)
    server.wait_for(
        lambda: requests.get(server.url("/ready"), timeout=5).json()["status"] == "failed",
        timeout=120,
        what="the failed state",
    )
    error = requests.get(server.url("/ready"), timeout=5).json()["error"]
    assert not error.startswith("start-up check"), error
    lines = {line["check"]: line for line in server.logs() if line.get("check")}
    assert lines["model-weights"]["verdict"] == "warning"


def test_pickled_weights_too_large_only_warn(tmp_path, demo_dir):
    from inference.model.demo import ensure_demo_model

    model = copy_of(ensure_demo_model(demo_dir), tmp_path)
    (model / "model.safetensors").unlink()
    with (model / "pytorch_model.bin").open("wb") as handle:
        handle.truncate(2 * mem_total())
    memory = verdicts(
        doctor("--json", "--model", str(model), "--device", "cpu", "--check", "memory")
    )["memory"]
    assert memory["status"] == "warning" and "an estimate" in memory["summary"], memory


def test_the_memory_limit_of_a_parent_cgroup_counts(tmp_path):
    from inference.doctor.host import cgroup_room

    def limit(directory: Path, maximum: str, current: int, inactive: int = 0, v1=False) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        names = (
            ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
            if v1
            else ("memory.max", "memory.current", "inactive_file")
        )
        (directory / names[0]).write_text(maximum + "\n")
        (directory / names[1]).write_text(f"{current}\n")
        (directory / "memory.stat").write_text(f"anon 1\n{names[2]} {inactive}\n")

    root = tmp_path / "v2"
    limit(root / "slurm" / "job_7", str(8 << 30), 3 << 30, inactive=1 << 30)  # the job's limit
    limit(root / "slurm" / "job_7" / "step_0", "max", 2 << 30)
    room = cgroup_room("0::/slurm/job_7/step_0\n", root)
    assert room == (6 << 30, str(root / "slurm" / "job_7" / "memory.max"))
    assert cgroup_room("0::/\n", tmp_path / "nothing") is None

    hybrid = tmp_path / "hybrid"
    limit(hybrid / "memory", str(4 << 30), 1 << 30, v1=True)  # a container: its root
    room = cgroup_room("4:memory:/docker/abc\n0::/\n", hybrid)
    assert room == (3 << 30, str(hybrid / "memory" / "memory.limit_in_bytes"))


def test_only_verdicts_that_would_stop_the_server_block_its_start():
    from inference.config import Config
    from inference.doctor.report import failed, warning
    from inference.doctor.startup import blocks_start

    auto, cuda = Config(device="auto"), Config(device="cuda")
    assert blocks_start(failed("model-weights", "s", "f"), auto)
    assert not blocks_start(warning("model-weights", "s", "f"), auto)
    assert not blocks_start(failed("cuda-driver", "s", "f"), auto)  # serves on the CPU
    assert blocks_start(failed("cuda-driver", "s", "f"), cuda)
    assert not blocks_start(
        failed("memory", "the check itself raised OSError", "f", raised=True), auto
    )


# ---- memory ----------------------------------------------------------------------------------


@pytest.mark.skipif(not NO_GPU, reason="the CPU case; the GPU case is test_gpu_memory_...")
def test_a_model_too_large_for_the_memory_fails(oversized_model):
    result = doctor("--json", "--model", str(oversized_model), "--check", "memory")
    assert result.returncode == 1
    found = verdicts(result)
    assert found["model-weights"]["status"] == "ok"  # whole, only too large
    memory = found["memory"]
    assert memory["status"] == "failed", memory
    values = memory["values"]
    assert values["device"] == "cpu" and values["dtype"] == "float32"
    assert values["weights_bytes"] == mem_total() // 1024 * 1024 * 4
    assert values["weights_bytes"] > values["available_bytes"]
    assert memory["summary"].startswith("the weights need ")
    assert "in float32 but cpu has" in memory["summary"]
    assert "smaller (or quantized) checkpoint" in memory["fix"]


def test_a_context_too_large_for_the_memory_warns_and_names_a_length_that_fits(tmp_path, demo_dir):
    from inference.model.demo import ensure_demo_model

    model = copy_of(ensure_demo_model(demo_dir), tmp_path)
    config = json.loads((model / "config.json").read_text())
    config["max_position_embeddings"] = 10**12
    (model / "config.json").write_text(json.dumps(config))
    result = doctor("--json", "--model", str(model), "--device", "cpu", "--check", "memory")
    memory = verdicts(result)["memory"]
    assert result.returncode == 0 and memory["status"] == "warning", memory
    fits = memory["values"]["fitting_tokens"]
    assert memory["fix"] == (f"--max-model-len {fits} (90 % of what is free beside the weights)")
    assert fits > 0 and fits % 256 == 0
    bytes_per_token = 2 * 4 * 4 * 32 * 4
    room = memory["values"]["available_bytes"] - memory["values"]["weights_bytes"]
    assert 0.85 * room <= fits * bytes_per_token <= 0.9 * room
    following = verdicts(
        doctor(
            "--json",
            "--model",
            str(model),
            "--device",
            "cpu",
            "--check",
            "memory",
            "--max-model-len",
            str(fits),
        )
    )["memory"]
    assert following["status"] == "ok", following


# ---- port, state directory, OTLP -------------------------------------------------------------


def test_a_port_in_use_fails_and_names_the_process_holding_it():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = doctor("--json", "--port", str(port), "--check", "port")
    found = verdicts(result)["port"]
    assert result.returncode == 1 and found["status"] == "failed"
    assert found["summary"].startswith(f"127.0.0.1:{port} is in use by pid {os.getpid()} (")
    assert "--port" in found["fix"]


def test_the_port_holder_is_named_with_its_whole_command_line():
    """A holder whose command line is long (a server with many options): the doctor's text
    names it whole, not cut at some width."""
    padding = "--option-" + "x" * 300
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import socket, sys, time\n"
            "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
            "print(s.getsockname()[1], flush=True); time.sleep(120)",
            padding,
            "last-argument",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        port = int(holder.stdout.readline())
        result = doctor("--port", str(port), "--check", "port")
    finally:
        holder.kill()
        holder.wait()
    expected = (
        f"is in use by pid {holder.pid} ({sys.executable} -c 'import socket, sys, time\\n"
        "s = socket.socket(); "
    )
    assert result.returncode == 1, result.stdout + result.stderr
    # One line, the program's line breaks written as \n.
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("failed")]
    assert expected in line, line
    assert line.endswith(f"{padding} last-argument)"), line


def test_an_unwritable_state_directory_fails():
    # As root, permission bits do not bind: drop the capability that overrides them.
    prefix = (
        ("setpriv", "--bounding-set", "-dac_override,-dac_read_search") if os.geteuid() == 0 else ()
    )
    if prefix and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv (util-linux)")
    directory = Path(tempfile.mkdtemp(prefix="vigil-readonly-"))
    try:
        directory.chmod(0o555)
        result = doctor(
            "--json", "--state-dir", str(directory), "--check", "state-dir", prefix=prefix
        )
        found = verdicts(result)["state-dir"]
        assert result.returncode == 1 and found["status"] == "failed", found
        assert found["summary"] == f"{directory} is not writable: Permission denied"
        assert "--state-dir" in found["fix"]
        nested = verdicts(
            doctor(
                "--json",
                "--state-dir",
                str(directory / "state"),
                "--check",
                "state-dir",
                prefix=prefix,
            )
        )["state-dir"]
        assert nested["status"] == "failed"
    finally:
        directory.chmod(0o755)
        shutil.rmtree(directory)


class _OtlpReceiver:
    """An OTLP/HTTP endpoint on loopback that records what it is sent."""

    def __init__(self):
        self.received: list[tuple[str, str, bytes]] = []
        received = self.received

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.append((self.path, self.headers.get("Content-Type"), body))
                self.send_response(200 if self.path == "/v1/traces" else 404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


def test_the_otlp_endpoint_is_checked_when_configured():
    receiver = _OtlpReceiver()
    try:
        result = doctor(
            "--json", "--check", "otlp", env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url}
        )
        found = verdicts(result)["otlp"]
        assert found["status"] == "ok", found
        assert receiver.received == [("/v1/traces", "application/x-protobuf", b"")]
        wrong_path = verdicts(
            doctor(
                "--json",
                "--check",
                "otlp",
                env={"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.url + "/wrong"},
            )
        )["otlp"]
        assert wrong_path["status"] == "warning" and "HTTP 404" in wrong_path["summary"]
    finally:
        receiver.server.shutdown()
    closed = verdicts(
        doctor(
            "--json",
            "--check",
            "otlp",
            env={"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}"},
        )
    )["otlp"]
    assert closed["status"] == "warning" and "does not answer" in closed["summary"]


# ---- packages --------------------------------------------------------------------------------


def pip_install_target(target: Path, requirement: str) -> None:
    """Install a real release into a directory of its own, as pip lays it out."""
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            requirement,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if run.returncode != 0:
        pytest.skip(
            f"pip could not install {requirement} (no package index?): {run.stderr.strip()[-300:]}"
        )


def test_the_deprecated_pynvml_package_shadowing_nvidia_ml_py_fails(tmp_path):
    # pynvml 11.x ships a pynvml/ package; ahead of nvidia-ml-py's pynvml.py it wins the import.
    pip_install_target(tmp_path, "pynvml==11.5.0")
    result = doctor("--json", "--check", "pynvml", env={"PYTHONPATH": str(tmp_path)})
    found = verdicts(result)["pynvml"]
    assert result.returncode == 1 and found["status"] == "failed", found
    assert found["summary"].startswith(
        "the deprecated pynvml package 11.5.0 installed its own "
        f"pynvml module ({tmp_path / 'pynvml' / '__init__.py'})"
    )
    assert found["fix"] == ("pip uninstall -y pynvml && pip install --force-reinstall nvidia-ml-py")


def test_the_deprecated_pynvml_shim_warns(tmp_path):
    # pynvml 12 and later ship only pynvml_utils and depend on nvidia-ml-py.
    pip_install_target(tmp_path, "pynvml==12.0.0")
    result = doctor("--json", "--check", "pynvml", env={"PYTHONPATH": str(tmp_path)})
    found = verdicts(result)["pynvml"]
    assert result.returncode == 0 and found["status"] == "warning", found
    assert "nvidia-ml-py's" in found["summary"]
    assert "pip uninstall -y pynvml" in found["fix"]


# ---- start-up checks in the server -----------------------------------------------------------


def test_the_server_reports_a_failed_start_up_check_with_its_fix(server_factory, sharded_model):
    model = copy_of(sharded_model, server_factory.tmp)
    (model / "model-00002-of-00008.safetensors").unlink()
    server = server_factory(model=str(model), ready=False)
    server.wait_for(
        lambda: requests.get(server.url("/ready"), timeout=5).json()["status"] == "failed",
        timeout=120,
        what="the failed state",
    )
    error = requests.get(server.url("/ready"), timeout=5).json()["error"]
    assert error.startswith("start-up check model-weights failed: 1 of the 8 shards")
    assert "fix: download the checkpoint again" in error
    logs = server.logs()
    verdict_lines = [line for line in logs if line.get("check")]
    assert {line["check"]: line["verdict"] for line in verdict_lines} == {
        "cuda-driver": "skipped" if NO_GPU else "ok",
        "gpu-visibility": "skipped" if NO_GPU else "ok",
        "compute-capability": "skipped" if NO_GPU else "ok",
        "model-source": "ok",
        "remote-code": "ok",
        "model-config": "ok",
        "model-weights": "failed",
        "memory": "skipped",
    }
    failed_line = next(line for line in verdict_lines if line["verdict"] == "failed")
    assert failed_line["level"] == "ERROR" and failed_line["fix"].startswith("download")
    assert not any("exception" in line or "Traceback" in line["message"] for line in logs)
    assert server.sample("inference_model_load_state", state="failed") == 1


@pytest.mark.skipif(not NO_GPU, reason="the CPU case")
def test_the_server_refuses_to_load_a_model_larger_than_memory(server_factory, oversized_model):
    server = server_factory(model=str(oversized_model), ready=False)
    server.wait_for(
        lambda: requests.get(server.url("/ready"), timeout=5).json()["status"] == "failed",
        timeout=120,
        what="the failed state",
    )
    error = requests.get(server.url("/ready"), timeout=5).json()["error"]
    assert error.startswith("start-up check memory failed: the weights need ")
    assert not any("exception" in line for line in server.logs())


def test_a_sound_start_logs_every_start_up_verdict(server):
    lines = {line["check"]: line for line in server.logs() if line.get("check")}
    assert set(lines) == {
        "cuda-driver",
        "gpu-visibility",
        "compute-capability",
        "model-source",
        "remote-code",
        "model-config",
        "model-weights",
        "memory",
    }
    assert lines["memory"]["verdict"] == "ok" and lines["memory"]["level"] == "INFO"
    assert "KV cache of one full context (2048 tokens)" in lines["memory"]["message"]


# ---- GPU rules, on the facts NVML and torch report -------------------------------------------

H100 = gpu_facts.NvmlGpu(0, "NVIDIA H100 80GB HBM3", "GPU-1111aaaa-0000", 79 << 30)
A10 = gpu_facts.NvmlGpu(1, "NVIDIA A10", "GPU-2222bbbb-0000", 23 << 30)
# What torch reports as each GPU's compute capability, by UUID.
CAPABILITY = {H100.uuid: (9, 0), A10.uuid: (8, 6), "GPU-3": (12, 0), "GPU-4": (5, 0)}
DRIVER_12_2 = gpu_facts.DriverFacts(None, "535.183.01", (12, 2), (H100, A10))
ARCHES = ("sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90")


def torch_facts(cuda: str | None, gpus=(), arch_list=ARCHES, warning=None) -> gpu_facts.TorchFacts:
    torch_gpus = tuple(
        gpu_facts.TorchGpu(i, g.name, CAPABILITY[g.uuid], g.uuid) for i, g in enumerate(gpus)
    )
    return gpu_facts.TorchFacts("2.x", cuda, bool(torch_gpus), warning, arch_list, torch_gpus)


def test_a_torch_build_for_a_newer_cuda_major_than_the_driver_fails():
    verdict = gpu.cuda_build_verdict(
        "auto",
        DRIVER_12_2,
        torch_facts(
            "13.0", warning="The NVIDIA driver on your system is too old (found version 12020)."
        ),
    )
    assert verdict.status is Status.FAILED
    assert "driver 535.183.01 supports CUDA up to 12.2" in verdict.summary
    assert "--index-url https://download.pytorch.org/whl/cu121" in verdict.fix


def test_a_newer_cuda_minor_than_the_driver_warns():
    verdict = gpu.cuda_build_verdict("cuda", DRIVER_12_2, torch_facts("12.8", (H100, A10)))
    assert verdict.status is Status.WARNING and "minor-version compatibility" in verdict.summary
    assert (
        gpu.cuda_build_verdict("cuda", DRIVER_12_2, torch_facts("12.1", (H100, A10))).status
        is Status.OK
    )


def test_a_cpu_build_of_torch_on_a_gpu_host_fails():
    verdict = gpu.cuda_build_verdict("auto", DRIVER_12_2, torch_facts(None))
    assert verdict.status is Status.FAILED and "CPU build" in verdict.summary
    assert "cu121" in verdict.fix and "--device cpu" in verdict.fix
    assert gpu.cuda_build_verdict("cpu", DRIVER_12_2, torch_facts(None)).status is Status.SKIPPED


def test_no_driver_fails_only_when_a_gpu_is_asked_for():
    none = gpu_facts.DriverFacts(error="NVML: Driver Not Loaded")
    assert gpu.cuda_build_verdict("cuda", none, torch_facts("12.8")).status is Status.FAILED
    assert gpu.cuda_build_verdict("auto", none, torch_facts(None)).status is Status.SKIPPED
    # PyPI's default torch is a CUDA build: on a CPU host with auto it serves on the CPU.
    assert gpu.cuda_build_verdict("auto", none, torch_facts("12.8")).status is Status.SKIPPED


def test_no_nvml_while_torch_uses_the_gpus_only_warns():
    # A container given the compute capability but not NVIDIA's utility libraries.
    none = gpu_facts.DriverFacts(error="NVML: NVML Shared Library Not Found")
    works = torch_facts("12.8", (H100,))
    assert gpu.cuda_build_verdict("cuda", none, works).status is Status.WARNING
    assert gpu.visibility_verdict("cuda", none, works, None).status is Status.OK


def test_cuda_visible_devices_is_read_as_cuda_reads_it():
    gpus = DRIVER_12_2.gpus
    assert gpu.visible_devices(None, gpus) is None
    assert gpu.visible_devices("1", gpus) == [A10]
    assert gpu.visible_devices("GPU-2222", gpus) == [A10]
    assert gpu.visible_devices("GPU-", gpus) == []  # ambiguous prefix names none
    assert gpu.visible_devices("1,0", gpus) == [A10, H100]
    assert gpu.visible_devices("1gpu", gpus) == [A10]  # strtoul
    assert gpu.visible_devices("0,7,1", gpus) == [H100]  # CUDA stops at the first bad entry
    assert gpu.visible_devices("0,0", gpus) == []  # a repeated GPU hides them all
    assert gpu.visible_devices("", gpus) == [] and gpu.visible_devices("-1", gpus) == []
    assert gpu.visible_devices("MIG-5a1c-0000", gpus) is None  # instances: not in NVML's list


def test_gpu_visibility_fails_only_without_the_gpu_the_server_uses():
    both = torch_facts("12.1", (H100, A10))
    assert gpu.visibility_verdict("auto", DRIVER_12_2, both, None).status is Status.OK
    one = torch_facts("12.1", (A10,))
    assert gpu.visibility_verdict("auto", DRIVER_12_2, one, "1").status is Status.OK
    unopened = gpu.visibility_verdict("cuda", DRIVER_12_2, one, None)
    assert unopened.status is Status.WARNING and "torch sees 1 of 2" in unopened.summary
    typo = gpu.visibility_verdict("cuda", DRIVER_12_2, torch_facts("12.1", (H100,)), "0,7")
    assert typo.status is Status.WARNING and "only the first 1 entry names" in typo.summary
    twice = gpu.visibility_verdict("cuda", DRIVER_12_2, torch_facts("12.1"), "0,0")
    assert twice.status is Status.FAILED and "names a GPU twice" in twice.summary
    hidden = gpu.visibility_verdict("auto", DRIVER_12_2, torch_facts("12.1"), "")
    assert hidden.status is Status.WARNING and "CPU" in hidden.summary
    assert (
        gpu.visibility_verdict("cuda", DRIVER_12_2, torch_facts("12.1"), "").status is Status.FAILED
    )
    beyond = gpu.visibility_verdict("cuda:2", DRIVER_12_2, both, None)
    assert beyond.status is Status.FAILED and "cuda:0 to cuda:1" in beyond.fix
    mig = gpu.visibility_verdict("cuda", DRIVER_12_2, torch_facts("12.1", (H100,)), "MIG-5a1c-0000")
    assert mig.status is Status.OK


def test_compute_capability_against_the_compiled_architectures():
    assert gpu.arch_supported((8, 6), ("sm_80",))  # same major, newer minor: runs
    assert gpu.arch_supported((8, 9), ("sm_80", "sm_86"))
    assert not gpu.arch_supported((9, 0), ("sm_80", "sm_86"))
    assert gpu.arch_supported((9, 0), ("sm_80", "compute_80"))  # PTX, compiled at load
    assert gpu.arch_supported((9, 0), ("sm_90a",)) and not gpu.arch_supported((9, 1), ("sm_90a",))
    assert not gpu.arch_supported((10, 0), ("compute_90a",))  # arch-specific PTX: 9.0 only
    assert gpu.arch_supported((10, 3), ("compute_100f",))  # family: same major
    assert not gpu.arch_supported((12, 0), ("compute_100f",))
    assert gpu.arch_supported((12, 0), ("sm_100", "sm_120"))
    assert not gpu.arch_supported((12, 0), ("sm_50", "sm_90"))
    assert not gpu.arch_supported((3, 7), ("sm_50", "sm_90"))  # too old for the build
    blackwell = gpu_facts.NvmlGpu(0, "NVIDIA RTX PRO 6000", "GPU-3", 95 << 30)
    verdict = gpu.capability_verdict("cuda:0", torch_facts("12.6", (blackwell,)))
    assert verdict.status is Status.FAILED and "cuda:0 (sm_120)" in verdict.summary
    assert gpu.capability_verdict("cuda:0", torch_facts("12.6", (H100, A10))).status is Status.OK
    # An old second GPU the server does not use: a warning, not a refusal.
    old = gpu_facts.NvmlGpu(1, "Quadro K2200", "GPU-4", 4 << 30)
    mixed = torch_facts("12.6", (H100, old), arch_list=("sm_80", "sm_90"))
    assert gpu.capability_verdict("cuda:0", mixed).status is Status.WARNING
    assert gpu.capability_verdict("cuda:1", mixed).status is Status.FAILED


def test_the_torch_wheel_suggested_fits_the_driver():
    assert gpu.torch_wheel_for((12, 2)).endswith("/cu121")
    assert gpu.torch_wheel_for((12, 8)).endswith("/cu128")
    assert gpu.torch_wheel_for((13, 1)).endswith("/cu130")
    assert gpu.torch_wheel_for((11, 4)) is None


def test_the_kernel_runs_on_the_gpus_the_server_may_use_and_names_wrong_and_wedged_ones():
    two = torch_facts("12.1", (H100, A10))
    assert gpu.kernel_indices("auto", two) == [0, 1] and gpu.kernel_indices("cuda:1", two) == [1]
    assert gpu.kernel_indices("cpu", two) == [] and gpu.kernel_indices("cuda:5", two) == []
    sound = gpu.kernel_verdict("auto", two, {0: 0.0021, 1: 0.0034}, 30)
    assert sound.status is Status.OK and "(cuda:0 2.1 ms, cuda:1 3.4 ms)" in sound.summary
    broken = gpu.kernel_verdict("auto", two, {0: "wrong result (relative error 0.9)"}, 30)
    assert broken.status is Status.FAILED and broken.values["wedged"] == ["cuda:1"]
    assert broken.summary == (
        "cuda:0: wrong result (relative error 0.9); cuda:1 did not finish "
        "within 30 s (a wedged GPU or driver: look for XID errors in dmesg)"
    )
    beyond = gpu.kernel_verdict("cuda:5", two, {}, 30)
    assert beyond.status is Status.SKIPPED and "not among torch's GPUs" in beyond.summary


def test_without_torch_the_driver_verdict_fails_only_for_a_gpu_without_a_driver():
    none = gpu_facts.DriverFacts(error="NVML: Driver Not Loaded")
    assert gpu.driver_verdict_without_torch("cuda", none, "torch").status is Status.FAILED
    auto = gpu.driver_verdict_without_torch("auto", none, "torch")
    assert auto.status is Status.SKIPPED and "pip install 'llm-vigil[serve]'" in auto.summary
    assert gpu.driver_verdict_without_torch("cpu", DRIVER_12_2, "torch").status is Status.SKIPPED


# ---- the GPU checks on a fake fleet ------------------------------------------------------------
# The driver's facts come through vigil.gpu, as the exporter's do; a fake fleet stands in for
# NVML there. torch is this machine's own.

FLEET = {
    "driver_version": "550.54.15",
    "cuda_version": "12.4",
    "nvml_version": "12.550.54.15",
    "gpus": [
        {
            "uuid": "GPU-11111111-2222-3333-4444-555555555555",
            "name": "NVIDIA H100 80GB HBM3",
            "memory_free_bytes": 4_000_000_000,
        },
        {
            "uuid": "GPU-66666666-7777-8888-9999-000000000000",
            "name": "NVIDIA GeForce RTX 4090",
            "memory_free_bytes": 24_557_220_864,
        },
    ],
}
FLEET_NAMES = "0: NVIDIA H100 80GB HBM3, 1: NVIDIA GeForce RTX 4090"
CPU_TORCH = pytest.mark.skipif(
    __import__("torch").version.cuda is not None or not NO_GPU,
    reason="needs a CPU build of torch (the GPUs are the fleet's)",
)


def fleet_file(tmp_path: Path, fleet: dict) -> str:
    path = tmp_path / "fleet.json"
    path.write_text(json.dumps(fleet))
    return str(path)


def gpu_verdicts(fleet: str, *args: str, **kwargs) -> dict[str, dict]:
    """The JSON verdicts of cuda-driver and gpu-visibility with the driver's GPUs from ``fleet``."""
    return verdicts(
        doctor(
            "--json",
            "--fake-gpu-fleet",
            fleet,
            "--check",
            "cuda-driver",
            "--check",
            "gpu-visibility",
            *args,
            **kwargs,
        )
    )


def with_gpu(index: int, **changes) -> dict:
    """FLEET with one GPU changed."""
    gpus = [dict(g) for g in FLEET["gpus"]]
    gpus[index].update(changes)
    return {**FLEET, "gpus": gpus}


def test_driver_facts_are_read_through_the_gpu_backend_which_is_closed_after():
    spec = with_gpu(0, hang_after_reads=1)
    spec["gpus"][1]["missing"] = ["memory_free_bytes"]
    fleet = FakeFleet(spec)
    facts = gpu_facts.read_driver(fleet)
    assert facts == gpu_facts.DriverFacts(
        None,
        "550.54.15",
        (12, 4),
        (
            gpu_facts.NvmlGpu(0, "NVIDIA H100 80GB HBM3", FLEET["gpus"][0]["uuid"], 4_000_000_000),
            gpu_facts.NvmlGpu(1, "NVIDIA GeForce RTX 4090", FLEET["gpus"][1]["uuid"], None),
        ),
    )
    # Closed: the read that would now wedge returns at once.
    with pytest.raises(GpuLost, match="closed"):
        gpu_facts._within(lambda: fleet.read(0), 10, "a read after the doctor's")
    assert gpu_facts.read_driver(FakeFleet({"gpus": []})) == gpu_facts.DriverFacts()


def test_a_wedged_driver_read_ends_at_the_deadline_as_no_driver():
    fleet = FakeFleet(with_gpu(1, hang_after_reads=0))
    try:
        facts = gpu_facts.GpuFacts(deadline=0.5, backend=fleet).driver
    finally:
        fleet.close()  # lets the reading thread go
    assert facts.error == "NVML did not answer within 0.5 s (a wedged driver or GPU?)"


@CPU_TORCH
def test_a_cpu_build_of_torch_under_a_gpu_fleet_fails_and_names_the_wheel_for_its_cuda(tmp_path):
    import torch

    fleet = fleet_file(tmp_path, FLEET)
    result = doctor(
        "--device",
        "cuda",
        "--fake-gpu-fleet",
        fleet,
        "--check",
        "cuda-driver",
        "--check",
        "gpu-visibility",
    )
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].endswith(f", GPUs from the fake fleet {fleet}")
    assert lines[1].split(None, 2) == [
        "failed",
        "cuda-driver",
        (
            f"torch {torch.__version__} is a CPU build, but the driver "
            "550.54.15 runs 2 GPU(s): the server would not use them"
        ),
    ]
    assert lines[2].strip() == (
        "fix: install a torch build the driver supports: pip install "
        "torch --index-url https://download.pytorch.org/whl/cu124 (or "
        "pass --device cpu to serve on the CPU on purpose)"
    )
    assert lines[3].split(None, 2) == [
        "failed",
        "gpu-visibility",
        (
            f"NVML sees 2 GPU(s) ({FLEET_NAMES}); torch sees 0; "
            "CUDA_VISIBLE_DEVICES=(unset): torch sees 0 of 2: it is a "
            "CPU build (see cuda-driver); --device cuda needs a GPU"
        ),
    ]
    assert lines[4].strip() == "fix: install a CUDA build of torch (see cuda-driver)"
    assert lines[-1] == "0 ok, 0 warning, 2 failed, 0 skipped"
    # With --device auto the server would fall back to the CPU: the build still fails the check.
    found = gpu_verdicts(fleet)
    assert found["cuda-driver"]["status"] == "failed"
    assert found["cuda-driver"]["values"] | {"seconds": 0} == {
        "driver_version": "550.54.15",
        "driver_cuda": "12.4",
        "torch": torch.__version__,
        "torch_cuda": None,
        "gpus": 2,
        "seconds": 0,
    }
    assert found["gpu-visibility"]["status"] == "warning"
    assert found["gpu-visibility"]["summary"].endswith("; the server will run on the CPU")


def test_a_gpu_lost_from_the_fleet_is_unreadable_and_the_others_still_seen(tmp_path):
    fleet = fleet_file(tmp_path, with_gpu(0, lost_after_reads=0))
    found = gpu_verdicts(fleet)
    visibility = found["gpu-visibility"]
    assert visibility["summary"].startswith(
        "NVML sees 2 GPU(s) (0: (unreadable: fake GPU 0 fell off the bus), "
        "1: NVIDIA GeForce RTX 4090); "
    ), visibility
    assert visibility["values"]["nvml"] == 2
    assert found["cuda-driver"]["values"]["gpus"] == 2


@CPU_TORCH
def test_a_fleet_whose_nvml_fails_to_start_gives_the_no_driver_verdicts(tmp_path):
    import torch

    fleet = fleet_file(tmp_path, {**FLEET, "fail_init": True})
    cuda = gpu_verdicts(fleet, "--device", "cuda")
    assert cuda["cuda-driver"]["status"] == "failed"
    assert cuda["cuda-driver"]["summary"] == (
        "--device cuda but no usable NVIDIA driver (fake fleet set to fail its initialisation)"
    )
    assert "install or load the NVIDIA driver" in cuda["cuda-driver"]["fix"]
    assert cuda["gpu-visibility"]["status"] == "skipped"
    assert cuda["gpu-visibility"]["summary"] == (
        "no NVIDIA driver and no CUDA in torch: nothing to compare"
    )
    auto = verdicts(doctor("--json", "--fake-gpu-fleet", fleet, "--check", "cuda-driver"))
    assert auto["cuda-driver"]["status"] == "skipped"
    assert auto["cuda-driver"]["summary"] == (
        "no NVIDIA driver (fake fleet set to fail its initialisation) and a CPU build of torch "
        f"{torch.__version__}: the server runs on the CPU"
    )


@CPU_TORCH
def test_gpu_visibility_reads_cuda_visible_devices_against_the_fleets_gpus(tmp_path):
    fleet = fleet_file(tmp_path, FLEET)

    def visibility(value: str, device: str = "auto") -> dict:
        return verdicts(
            doctor(
                "--json",
                "--device",
                device,
                "--fake-gpu-fleet",
                fleet,
                "--check",
                "gpu-visibility",
                env={"CUDA_VISIBLE_DEVICES": value},
            )
        )["gpu-visibility"]

    typo = visibility("GPU-66666666,GPU-99")
    assert typo["status"] == "warning" and typo["values"]["expected"] == 1, typo
    assert typo["summary"] == (
        f"NVML sees 2 GPU(s) ({FLEET_NAMES}); torch sees 0; "
        "CUDA_VISIBLE_DEVICES='GPU-66666666,GPU-99': only the first 1 entry names a GPU (CUDA "
        "ignores every entry after one that names no GPU); the server will run on the CPU"
    )
    twice = visibility("1,GPU-6666", device="cuda")
    assert twice["status"] == "failed" and twice["values"]["expected"] == 0, twice
    assert twice["summary"].endswith(
        "'1,GPU-6666': it names a GPU twice, which hides every GPU "
        "from CUDA; --device cuda needs a GPU"
    )


# ---- a light install: no torch, transformers or OpenTelemetry ----------------------------------

# python -m inference in an interpreter where the serve extra's packages are absent, as after
# `pip install llm-vigil`: they cannot be imported, and importlib.metadata does not list them.
SERVE_ONLY = (
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "opentelemetry",
    "starlette",
    "uvicorn",
)
LIGHT_INSTALL = textwrap.dedent(f"""
    import importlib.abc, importlib.machinery, runpy, sys

    ABSENT = {SERVE_ONLY!r}

    class Absent(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ABSENT:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None

    def installed(distribution):
        name = distribution.metadata["Name"].lower().replace("_", "-")
        return name.split("-")[0] not in ABSENT

    find = importlib.machinery.PathFinder.find_distributions
    importlib.machinery.PathFinder.find_distributions = staticmethod(
        lambda *args, **kwargs: filter(installed, find(*args, **kwargs)))
    sys.meta_path.insert(0, Absent())
    sys.argv = ["inference", *sys.argv[1:]]
    runpy.run_module("inference", run_name="__main__", alter_sys=True)
""")


def test_a_light_install_runs_the_host_checks_and_names_the_serve_extra(tmp_path):
    receiver_port = free_port()  # nothing listens there: the OTLP check runs and warns
    result = doctor(
        "--json",
        "--fake-gpu-fleet",
        fleet_file(tmp_path, FLEET),
        "--demo-dir",
        str(tmp_path / "demo"),
        "--state-dir",
        str(tmp_path / "state"),
        "--port",
        str(free_port()),
        launcher=("-c", LIGHT_INSTALL),
        env={"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver_port}"},
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    found = verdicts(result)
    from inference.doctor.checks import NAMES

    assert list(found) == list(NAMES)
    assert not [name for name, v in found.items() if v["values"].get("raised")], found
    for name in ("python", "pip-check", "pynvml", "port", "state-dir"):
        assert found[name]["status"] == "ok", found[name]
    assert found["otlp"]["status"] == "warning" and "does not answer" in found["otlp"]["summary"]
    packages = found["packages"]
    assert packages["status"] == "failed" and "torch is not installed" in packages["summary"]
    assert packages["fix"].startswith("pip install 'llm-vigil[serve]'")
    # NVML's side of the GPU checks works without torch, and says which torch fits the driver.
    assert found["cuda-driver"]["status"] == "skipped"
    assert found["cuda-driver"]["summary"] == (
        f"driver 550.54.15 supports CUDA up to 12.4 with 2 GPU(s) ({FLEET_NAMES}), but torch is "
        "not installed, so there is no CUDA build to compare: install a torch build the driver "
        "supports: pip install torch --index-url https://download.pytorch.org/whl/cu124, then "
        "pip install 'llm-vigil[serve]'"
    )
    for name in ("gpu-visibility", "compute-capability", "gpu-kernel", "memory"):
        assert found[name]["status"] == "skipped", found[name]
        assert found[name]["summary"] == (
            "needs torch, which is not installed: pip install "
            "'llm-vigil[serve]' adds what the server runs on"
        )
    source = found["model-source"]  # building the demo model needs the serve extra
    assert source["status"] == "skipped" and source["values"]["missing"] in SERVE_ONLY
    assert "pip install 'llm-vigil[serve]'" in source["summary"]


# ---- on a real GPU ---------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_checks_pass_on_a_sound_gpu_machine(tmp_path, demo_dir):
    result = doctor(
        "--json",
        "--device",
        "cuda",
        "--demo-dir",
        demo_dir,
        "--port",
        str(free_port()),
        "--state-dir",
        str(tmp_path / "state"),
    )
    found = verdicts(result)
    print(json.dumps({k: (v["status"], v["summary"]) for k, v in found.items()}, indent=1))
    assert found["cuda-driver"]["status"] in ("ok", "warning"), found["cuda-driver"]
    for name in ("gpu-visibility", "compute-capability", "gpu-kernel", "memory"):
        assert found[name]["status"] == "ok", found[name]
    assert found["memory"]["values"]["device"] == "cuda:0"
    assert result.returncode == 0


@pytest.mark.gpu
def test_the_driver_facts_come_from_nvml_which_is_shut_down_after():
    backend = NvmlBackend()
    facts = gpu_facts.read_driver(backend)
    assert facts.available and facts.cuda_version and facts.gpus, facts
    assert all(g.uuid.startswith("GPU-") and g.memory_free for g in facts.gpus), facts
    with pytest.raises(BackendUnavailable):
        backend.device_count()  # closed
    backend.init()  # and started again
    try:
        assert backend.device_count() == len(facts.gpus)
    finally:
        backend.close()


@pytest.mark.gpu
def test_gpu_visibility_on_a_real_gpu_machine(demo_dir):
    hidden = verdicts(
        doctor("--json", "--check", "gpu-visibility", env={"CUDA_VISIBLE_DEVICES": ""})
    )["gpu-visibility"]
    assert hidden["status"] == "warning", hidden
    typo = verdicts(
        doctor("--json", "--check", "gpu-visibility", env={"CUDA_VISIBLE_DEVICES": "0,99"})
    )["gpu-visibility"]
    assert typo["status"] == "warning" and "only the first 1" in typo["summary"], typo
    twice = verdicts(
        doctor(
            "--json",
            "--device",
            "cuda",
            "--check",
            "gpu-visibility",
            env={"CUDA_VISIBLE_DEVICES": "0,0"},
        )
    )["gpu-visibility"]
    assert twice["status"] == "failed", twice


@pytest.mark.gpu
def test_gpu_memory_too_small_for_the_weights_fails(tmp_path, demo_dir):
    import torch

    from inference.model.demo import ensure_demo_model

    model = copy_of(ensure_demo_model(demo_dir), tmp_path)
    _, total = torch.cuda.mem_get_info(0)
    write_sparse_safetensors(model / "model.safetensors", total, dtype="F32")  # >= 2x the VRAM
    found = verdicts(
        doctor("--json", "--device", "cuda", "--model", str(model), "--check", "memory")
    )["memory"]
    assert found["status"] == "failed" and found["values"]["device"] == "cuda:0", found
