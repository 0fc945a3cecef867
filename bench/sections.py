"""One named section of a markdown file (between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``), replaced by a
bench that owns it while the rest of the file stays as the other benches wrote it."""

from __future__ import annotations

import re
from pathlib import Path


def replace_section(path: Path, name: str, body: str) -> None:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    old = path.read_text() if path.exists() else ""
    old = re.sub(re.escape(begin) + ".*?" + re.escape(end) + "\n?", "", old, flags=re.S)
    path.write_text(f"{old.rstrip()}\n\n{begin}\n{body.strip()}\n{end}\n")
    print(f"wrote {path}")
