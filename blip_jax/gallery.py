"""A self-contained HTML gallery: images with the texts a model produced for them."""

from __future__ import annotations

import html
import os
from pathlib import Path

from blip_jax.atomic import write_file

_STYLE = """body{font-family:sans-serif;margin:2em;background:#fafafa}
.grid{display:flex;flex-wrap:wrap;gap:1em}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.6em;width:220px}
.card img{width:100%;image-rendering:pixelated;border-radius:4px}
.card p{margin:.3em 0;font-size:.9em}.muted{color:#777}"""


def write_gallery(path: str | Path, items: list[dict], title: str) -> Path:
    """items: [{"image": path, "lines": [str, ...]}]; image paths are written relative to the page."""
    path = Path(path)
    cards = []
    for item in items:
        src = os.path.relpath(Path(item["image"]).absolute(), path.parent.absolute())
        lines = "".join(f"<p>{html.escape(str(line))}</p>" for line in item.get("lines", []))
        cards.append(f'<div class="card"><img src="{html.escape(src)}" alt=""><p class="muted">'
                     f"{html.escape(Path(item['image']).name)}</p>{lines}</div>")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<div class='grid'>{''.join(cards)}</div></body></html>\n")
    return write_file(path, page)
