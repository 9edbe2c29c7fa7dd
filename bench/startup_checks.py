"""What the start-up checks add to a server's start: their time against the model load's, in one
process, on the demo model saved as one file and as 8 shards.

Both are measured warm (imports done, files in the page cache) and alternately, ``--rounds``
times each; printed as medians and the ratio checks / load. The demo model loads in a fraction
of a second, so the ratio is an upper bound: a real checkpoint's load grows with its size, the
checks only with its number of tensors. Run: ``.venv/bin/python bench/startup_checks.py``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument(
        "--demo-dir",
        default=os.environ.get("VIGIL_TEST_DEMO_DIR") or str(Path.home() / ".cache" / "llm-vigil"),
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from loguru import logger
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from inference.config import Config
    from inference.doctor.startup import run_startup_checks
    from inference.model.demo import ensure_demo_model
    from inference.model.loader import load_model

    logger.remove()  # the verdict lines are not what is measured
    hf_logging.disable_progress_bar()
    demo = ensure_demo_model(args.demo_dir)
    sharded = Path(tempfile.mkdtemp(prefix="vigil-bench-sharded-"))
    AutoModelForCausalLM.from_pretrained(demo).save_pretrained(sharded, max_shard_size="2MB")
    AutoTokenizer.from_pretrained(demo).save_pretrained(sharded)
    print(f"{'checkpoint':<10} {'checks (ms)':>12} {'load (ms)':>10} {'checks/load':>12}")
    for label, model in (("1 file", str(demo)), ("8 shards", str(sharded))):
        config = replace(Config(), model=model, device="cpu")
        run_startup_checks(config), load_model(config)  # warm
        checks, loads = [], []
        for _ in range(args.rounds):
            started = time.perf_counter()
            run_startup_checks(config)
            checks.append(time.perf_counter() - started)
            started = time.perf_counter()
            load_model(config)
            loads.append(time.perf_counter() - started)
        check_ms = statistics.median(checks) * 1000
        load_ms = statistics.median(loads) * 1000
        print(f"{label:<10} {check_ms:>12.1f} {load_ms:>10.1f} {check_ms / load_ms:>12.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
