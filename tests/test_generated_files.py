"""Every generated file is committed as its generator writes it (tools/generate.py: the alert
rules and the alerts README's parameters table, the dashboards, the metrics reference, the golden
files), and the check finds a file that is stale, missing or left over."""

from __future__ import annotations

import shutil

from tools.generate import REPO, main, stale_files, write


def test_every_generated_file_is_current():
    stale = stale_files()
    report = "\n".join(f"{item.path}:\n{item.diff()}" for item in stale)
    assert not stale, (
        f"{len(stale)} generated file(s) out of date "
        f"({', '.join(item.path for item in stale)}): run scripts/generate\n" + report
    )


def test_the_check_finds_stale_missing_and_left_over_files(tmp_path, capsys):
    (tmp_path / "alerts").mkdir()
    shutil.copy(REPO / "alerts" / "README.md", tmp_path / "alerts" / "README.md")
    written = {item.path for item in write(tmp_path)}
    assert {
        "alerts/hangs.rules.yml",
        "dashboards/gpus.json",
        "docs/metrics.md",
        "tests/data/golden_gpu.prom",
    } <= written
    assert "alerts/README.md" not in written  # its table was current already
    assert stale_files(tmp_path) == []

    gpus = tmp_path / "dashboards" / "gpus.json"
    gpus.write_text(gpus.read_text().replace('"refresh": "10s"', '"refresh": "1m"'))
    (tmp_path / "docs" / "metrics.md").unlink()
    (tmp_path / "dashboards" / "retired.json").write_text("{}\n")
    readme = tmp_path / "alerts" / "README.md"
    readme.write_text(readme.read_text().replace("| `hang_for` | `30s` |", "| `hang_for` | `1s` |"))
    assert {item.path for item in stale_files(tmp_path)} == {
        "dashboards/gpus.json",
        "docs/metrics.md",
        "dashboards/retired.json",
        "alerts/README.md",
    }

    assert main(["--check"], repo=tmp_path) == 1
    out = capsys.readouterr().out
    assert "dashboards/gpus.json: stale" in out and '+  "refresh": "10s",' in out
    assert "docs/metrics.md: missing" in out
    assert "dashboards/retired.json: no generator writes it" in out
    assert "4 generated file(s) out of date: run scripts/generate" in out
    assert readme.read_text().count("`1s`") == 1  # --check wrote nothing

    assert main([], repo=tmp_path) == 0
    assert not (tmp_path / "dashboards" / "retired.json").exists()
    assert "`1s`" not in readme.read_text()
    assert stale_files(tmp_path) == []
    assert main(["--check"], repo=tmp_path) == 0
