"""The README's metric reference names every metric family zmon exports."""

from __future__ import annotations

import re
from pathlib import Path

from tests.catalogue import code_families

README = Path(__file__).resolve().parents[2] / "README.md"


def documented_names(text: str) -> set[str]:
    """Names in backticks, expanding the table shorthand `zmon_x_a`, `_b` → zmon_x_a, zmon_x_b."""
    names: set[str] = set()
    for line in text.splitlines():
        if not line.startswith("|"):
            continue
        first = line.split("|")[1]
        tokens = re.findall(r"`([a-z0-9_]+)`", first)
        base = ""
        for tok in tokens:
            if tok.startswith("zmon_"):
                names.add(tok)
                base = tok
            elif tok.startswith("_") and base:
                # `_suffix` replaces some trailing words of the previous full name: accept every such reading
                parts = base.split("_")
                names.update("_".join(parts[:k]) + tok for k in range(2, len(parts) + 1))
    return names


def test_every_exported_family_is_documented() -> None:
    exported = code_families()
    documented = documented_names(README.read_text())

    def doc_forms(name: str, kind: str) -> set[str]:
        forms = {name}
        if kind.startswith("Counter"):
            forms.add(name + "_total")
        if kind.startswith("Info"):
            forms.add(name + "_info")
        return forms

    missing = sorted(n for n, kind in exported.items() if not doc_forms(n, kind) & documented)
    assert not missing, f"README metric reference lacks: {missing}"
