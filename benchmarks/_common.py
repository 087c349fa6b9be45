"""What every benchmark script shares: writing its report atomically, and version facts."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_report(out_path: Path, report: dict) -> dict:
    """`report` as indented JSON at `out_path`, written atomically (a reader never sees half a file)."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", dir=out_path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        os.replace(tmp_name, out_path)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    print(f"wrote {out_path}")
    return report


def jaxlib_version():
    try:
        import jaxlib

        return jaxlib.__version__
    except Exception:  # pragma: no cover
        return None
