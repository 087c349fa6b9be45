"""What every benchmark script shares: writing its report atomically, and version facts."""

from __future__ import annotations

from pathlib import Path

from blip_jax.atomic import write_json


def write_report(out_path: Path, report: dict) -> dict:
    """`report` as indented JSON at `out_path`, written atomically (a reader never sees half a file)."""
    write_json(out_path, report)
    print(f"wrote {out_path}")
    return report


def jaxlib_version():
    try:
        import jaxlib

        return jaxlib.__version__
    except Exception:  # pragma: no cover
        return None
