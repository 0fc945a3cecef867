"""One named section of a markdown file (between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``), replaced by a
bench that owns it while the rest of the file stays as the other benches wrote it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any


def replace_section(path: Path, name: str, body: str) -> None:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    old = path.read_text() if path.exists() else ""
    old = re.sub(re.escape(begin) + ".*?" + re.escape(end) + "\n?", "", old, flags=re.S)
    path.write_text(f"{old.rstrip()}\n\n{begin}\n{body.strip()}\n{end}\n")
    print(f"wrote {path}")


def write_results(path: Path, name: str, *, heading: str, module: str, intro: str, table: str, raw: Any) -> None:
    """A bench's section: ``### heading (`python -m module`)``, the intro, its table and the raw numbers as JSON."""
    body = f"### {heading} (`python -m {module}`)\n\n{intro}\n\n{table}\n\nRaw: `{json.dumps(raw)}`\n"
    replace_section(path, name, body)
