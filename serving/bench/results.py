"""Where every benchmark leaves its figures: `<prefix>-<UTC stamp>.json` and `.md` side by side."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path


def write_results(
    out_dir: Path, prefix: str, when: dt.datetime, payload: dict, md: str, log: Callable[[str], None] = print
) -> Path:
    """Write both files, show the Markdown, and return the common stem."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{prefix}-{when.strftime('%Y%m%d-%H%M%S')}"
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    stem.with_suffix(".md").write_text(md)
    log(md)
    log(f"wrote {stem}.json and {stem}.md")
    return stem
