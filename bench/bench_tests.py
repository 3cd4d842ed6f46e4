# SPDX-License-Identifier: AGPL-3.0-or-later
"""The fast unit suite's time: ``pytest -m "not mesh"`` (no cluster, no rpc-server, no model), as the README quotes it.

    .venv/bin/python bench/bench_tests.py [--repeats 3] [--out bench/results/tests.json]

Runs the suite ``--repeats`` times in a fresh interpreter each, and records the wall time of each run (the median is
the figure), the tests that passed and the machine. A run that fails is an error: its time is not the suite's.
"""

from __future__ import annotations

import argparse
import logging
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

if not __package__:  # run as a file, not with python -m: import the bench package from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "bench"

from bench import common

logger = logging.getLogger("bench.tests")
ROOT = Path(__file__).resolve().parents[1]
COMMAND = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not mesh"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench/results/tests.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    t_start = time.perf_counter()
    runs = []
    for i in range(args.repeats):
        t0 = time.perf_counter()
        proc = subprocess.run(COMMAND, cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]
        if proc.returncode != 0:
            raise SystemExit(f"the unit suite failed (run {i + 1}): {tail}")
        passed = int(m[1]) if (m := re.search(r"(\d+) passed", tail)) else 0
        runs.append({"seconds": seconds, "passed": passed})
        logger.info("run %d: %d passed in %.1f s", i + 1, passed, seconds)
    unit = {"seconds": statistics.median(r["seconds"] for r in runs), "passed": runs[-1]["passed"],
            "command": 'pytest -m "not mesh"', "runs": runs}
    result = {"benchmark": "tests", "machine": common.machine_info(), "unit": unit, "texts_match": True,
              "total_seconds": time.perf_counter() - t_start}
    table = common.render([["suite", "tests", "seconds (median)"],
                           [unit["command"], str(unit["passed"]), f"{unit['seconds']:.1f}"]], markdown=False)
    return common.finish(result, args.out, table)


if __name__ == "__main__":
    sys.exit(main())
