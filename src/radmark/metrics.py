"""``<run_dir>/metrics.json``: one flat JSON object per run, keys ``stage/metric``.

Every stage adds its keys with :func:`update_metrics`; tables and plots are built from these files only.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from radmark.io import read_json, write_json

METRICS_FILE = "metrics.json"


def git_state(cwd: str | Path | None = None) -> dict[str, Any]:
    """The git SHA of the code that ran and whether the tree had uncommitted changes."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=cwd, capture_output=True, text=True, check=True,
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        return {"git/sha": "unknown", "git/dirty": None}
    return {"git/sha": sha, "git/dirty": dirty}


def flatten(prefix: str, node: Any) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"prefix/a.b": 1}`` (lists kept as values)."""
    out: dict[str, Any] = {}
    if isinstance(node, dict):
        for key, value in node.items():
            sub = f"{prefix}.{key}" if not prefix.endswith("/") else f"{prefix}{key}"
            out.update(flatten(sub, value))
    else:
        out[prefix] = node
    return out


def read_metrics(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / METRICS_FILE
    return read_json(path) if path.exists() else {}


def update_metrics(run_dir: str | Path, values: dict[str, Any]) -> dict[str, Any]:
    """Merge ``values`` into the run's metrics.json (atomic rewrite) and return the whole object."""
    bad = [k for k in values if "/" not in k]
    if bad:
        raise ValueError(f"metric keys must look like 'stage/metric', got {bad}")
    merged = read_metrics(run_dir)
    merged.update(values)
    write_json(Path(run_dir) / METRICS_FILE, merged)
    return merged
