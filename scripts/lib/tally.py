"""One closing line for several pytest runs: ``tally.py NAME=RESULTS.xml ...`` reads each run's
JUnit XML (pytest --junitxml), prints a line per run (indented), then
``total: N passed, N failed, N skipped`` (errors count as failures, xfails as skipped; a run
whose file is missing counts as one failure)."""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def counts(path: Path) -> tuple[int, int, int]:
    """(passed, failed, skipped) of one JUnit XML file."""
    root = ET.parse(path).getroot()  # noqa: S314 - pytest's own report, written by this run
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    tests = failed = skipped = 0
    for suite in suites:
        tests += int(suite.get("tests", 0))
        failed += int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        skipped += int(suite.get("skipped", 0))
    return tests - failed - skipped, failed, skipped


def main(argv: list[str]) -> int:
    total = [0, 0, 0]
    for arg in argv:
        name, _, file = arg.rpartition("=")
        path = Path(file)
        if path.is_file():
            passed, failed, skipped = counts(path)
            print(
                f"  {name or path.stem} ({path}) - {passed} passed, {failed} failed, "
                f"{skipped} skipped"
            )
        else:
            passed, failed, skipped = 0, 1, 0
            print(f"  {name or path.stem} - did not run ({path} missing)")
        for i, n in enumerate((passed, failed, skipped)):
            total[i] += n
    print(f"total: {total[0]} passed, {total[1]} failed, {total[2]} skipped")
    return 1 if total[1] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
