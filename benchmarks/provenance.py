"""Where a benchmark figure came from: commit, uncommitted source, machine, command, time.

Every result JSON in benchmarks/results/ carries this record, so a figure in the README or RESULTS.md can
be traced to the code and the machine that produced it.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ISA_LIMITS = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
    return done.stdout.strip()


# The commit the benchmark's code came from: read when the benchmark imports this module (at its start),
# not when it writes its results (commits may land in between).
COMMIT_AT_START = _git("rev-parse", "HEAD")
SRC_UNCOMMITTED_AT_START = _git("status", "--porcelain", "--", "src").splitlines()


def stamp() -> str:
    """A UTC time stamp for file names: 20261202T031500Z."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def record() -> dict:
    """The provenance fields: commit, src/ changes not yet committed, CPU, ISA limits, command."""
    from resfit.hardware import detect_cpu

    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": COMMIT_AT_START,
        "src_uncommitted": SRC_UNCOMMITTED_AT_START,
        "commit_at_end": _git("rev-parse", "HEAD"),
        "cpu": detect_cpu().describe(),
        "host": platform.node(),
        "platform": platform.platform(),
        "isa_limits": {name: os.environ.get(name) for name in ISA_LIMITS},
        "load_average": os.getloadavg(),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
