"""Copies the README's "Runbooks" section into the package (zmon/runbooks.md), which every zmon serves as
GET /runbooks: the target of its alerts' runbook_url, wherever zmon is installed.

    python tools/gen_runbooks.py          # rewrite zmon/runbooks.md
    python tools/gen_runbooks.py --check  # exit 1 if it differs from the README (tests/unit/test_runbooks.py)

Edit the README, not the copy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
OUTPUT = ROOT / "zmon" / "runbooks.md"
HEADING = "## Runbooks"


def render() -> str:
    """The README's Runbooks section, from its heading to the next level-2 heading."""
    text = README.read_text()
    start = text.index("\n" + HEADING + "\n") + 1
    end = text.find("\n## ", start + len(HEADING))
    section = text[start:] if end < 0 else text[start : end + 1]
    header = "<!-- Generated from README.md by tools/gen_runbooks.py: edit the README. -->\n"
    return header + section.rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--check", action="store_true", help="compare with the committed file instead of writing")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{OUTPUT} is out of date: run python tools/gen_runbooks.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
