"""Where a benchmark figure came from: commit, date and command, stamped on every JSON record."""
from __future__ import annotations

import datetime
import os
import subprocess
import sys


def commit() -> str:
    """FNF_COMMIT when set (a copied tree without .git), else the short HEAD of this checkout, else "unknown"."""
    if os.environ.get("FNF_COMMIT"):
        return os.environ["FNF_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def stamp(argv=None) -> dict:
    """{"commit", "date", "command"} for the running script (``argv`` when main() was called with one)."""
    args = sys.argv[1:] if argv is None else list(argv)
    return {"commit": commit(), "date": datetime.date.today().isoformat(),
            "command": " ".join(["python", sys.argv[0], *args])}
