"""Where a benchmark's figures go: `<out>.json` ({"header": ..., "rows": [...]}) and `<out>.md` (its table)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


def write_results(out, header: dict, rows, table: Optional[str] = None) -> None:
    """The JSON of `header` and `rows` (rewritten as rows come, so a run cut short keeps what it measured) and,
    once given, the Markdown `table`, which is printed too."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    if table is not None:
        out.with_suffix(".md").write_text(table)
        print(table)
