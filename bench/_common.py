"""What every benchmark records about its run, and how it writes its JSON."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

from rich.console import Console


def machine(load_before: tuple[float, float, float]) -> dict[str, Any]:
    """The machine and how busy it was (1, 5, 15 min load averages before and after)."""
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }


def write_json(path: Path | None, result: dict[str, Any], console: Console) -> None:
    """Write ``result`` to ``path`` (if given), making its directory."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {path}")
