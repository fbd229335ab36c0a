"""What every benchmark JSON starts with (which benchmark, on what device, when, at which commit, by what command,
with which config) and how it ends (the command printed, the JSON written), so that a figure quoted anywhere can
be traced and re-measured."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def commit() -> str:
    """PRETRAIN_COMMIT when set (a copy of the tree without `.git`, as on a lent GPU machine: the caller knows it),
    else git's HEAD, else "unknown" (no repository, or no git binary): never a reason to lose a measurement."""
    if os.environ.get("PRETRAIN_COMMIT"):
        return os.environ["PRETRAIN_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    except OSError:
        head = ""
    return head or "unknown"


def provenance(benchmark: str, device: str, config: Any) -> dict[str, Any]:
    return {"benchmark": benchmark, "device": device, "date": time.strftime("%Y-%m-%d"), "commit": commit(),
            "command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "config": config}


def report(result: dict[str, Any], out: Path | None) -> None:
    """Print the command that measured `result`; write it as JSON to `out` when given."""
    print(f"measured by: {result['command']}")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}")
