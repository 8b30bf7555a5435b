"""Keep generated doc sections true: `python tools/readme.py` rewrites the config reference in docs/configuration.md."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ftcore.config_files import config_reference  # noqa: E402


def splice(text: str, marker: str, content: str) -> str:
    """Replace what stands between `<!-- marker:start -->` and `<!-- marker:end -->`."""
    pattern = re.compile(rf"(<!-- {marker}:start -->\n).*?(<!-- {marker}:end -->)", re.S)
    if not pattern.search(text):
        raise ValueError(f"no {marker} markers")
    return pattern.sub(lambda m: m.group(1) + content.rstrip("\n") + "\n" + m.group(2), text)


def section(text: str, marker: str) -> str:
    match = re.search(rf"<!-- {marker}:start -->\n(.*?)<!-- {marker}:end -->", text, re.S)
    return match.group(1) if match else ""


CONFIG_DOC = ROOT / "docs" / "configuration.md"


def main() -> None:
    CONFIG_DOC.write_text(splice(CONFIG_DOC.read_text(), "config", config_reference()))


if __name__ == "__main__":
    main()
