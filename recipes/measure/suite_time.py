"""Run the README's test command, time it, and write where the time goes.

    python launch/suite_time.py                  # the whole suite: docs/tests/suite.json, then the docs' blocks
    python launch/suite_time.py -m smoke         # the quick tier: docs/tests/smoke.json

Runs `python -m pytest -q --durations=0` (offline, with the arguments given after the flags), reads pytest's summary
line and every duration it prints, sums them by test file (a shared launch counts for the first test that needs it),
and writes the count, the wall time, the hardware, the date and the per-file seconds to docs/tests/<suite or
smoke>.json. The README's and docs/tests.md's blocks are then rewritten from those files
(`optimizer_recipes.measure.doc_blocks`), so that no one types a test count or a time. A failing suite writes
nothing and exits with pytest's status.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "docs" / "tests"
SUMMARY = re.compile(r"(\d+) passed(?:, (\d+) skipped)?.* in ([\d.]+)s")
DURATION = re.compile(r"^([\d.]+)s (?:call|setup|teardown)\s+(tests/[^:\s]+)::", re.M)


def parse(output: str) -> dict:
    """pytest's summary and --durations lines: tests passed, wall seconds, seconds per test file."""
    summary = SUMMARY.findall(output)
    if not summary:
        raise SystemExit("suite_time: no pytest summary line in the output")
    passed, skipped, wall = summary[-1]
    per_file: dict[str, float] = defaultdict(float)
    for seconds, path in DURATION.findall(output):
        per_file[Path(path).name] += float(seconds)
    return {"passed": int(passed), "skipped": int(skipped or 0), "wall_s": float(wall),
            "test_s": round(sum(per_file.values()), 1),
            "per_file_s": {name: round(s, 1) for name, s in sorted(per_file.items(), key=lambda kv: -kv[1])}}


def main(argv=None) -> None:
    from optimizer_recipes.core.run.throughput import hardware
    from optimizer_recipes.measure.doc_blocks import write_blocks

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.usage = "%(prog)s [pytest arguments, e.g. -m smoke]"
    _, pytest_args = parser.parse_known_args(argv)  # every argument is pytest's (-m smoke starts with a dash)
    name = "smoke" if "smoke" in pytest_args else "suite"
    command = [sys.executable, "-m", "pytest", "-q", "--durations=0", "-p", "no:cacheprovider", *pytest_args]
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True,
                          text=True)
    sys.stdout.write(proc.stdout[-3000:])
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(proc.returncode)
    record = {"command": "HF_HUB_OFFLINE=1 python -m pytest -q" + "".join(f" {a}" for a in pytest_args),
              "date": datetime.date.today().isoformat(), "hardware": hardware(),
              "elapsed_s": round(time.perf_counter() - started, 1), **parse(proc.stdout)}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    changed = write_blocks()
    print(f"wrote {OUT / f'{name}.json'}; rewrote {', '.join(changed) or 'no block'}")


if __name__ == "__main__":
    main()
