"""Reads docs/protocol.md's tables so tests can hold the code to the spec.

Message tables are the tables whose header row is `| type | name | direction | body |`; the error
table's is `| code | name | meaning |`. A message's documented fields are every backticked
lower-case identifier in its body cell (nested field names included), merged over every table
that lists the type (ERROR appears on both planes). Literal values are written quoted
(`"ok"`), so they are not taken for fields, nor are dotted names (`heartbeat.interval_s`) or
upper-case ones (message types, error codes).
"""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"

_IDENT = re.compile(r"`([a-z_][a-z0-9_]*)`")


def _tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every markdown table: (header cells, body rows as cells)."""
    tables, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"^\|[-| :]+\|$", lines[i + 1].strip()):
            header = _cells(lines[i])
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            tables.append((header, rows))
        else:
            i += 1
    return tables


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def message_table(text: str | None = None) -> dict[int, tuple[str, set[str]]]:
    """{type number: (name, documented field names)} from every message table."""
    text = DOC.read_text() if text is None else text
    out: dict[int, tuple[str, set[str]]] = {}
    for header, rows in _tables(text):
        if [h.lower() for h in header[:4]] != ["type", "name", "direction", "body"]:
            continue
        for row in rows:
            number, name = int(row[0]), row[1]
            body = "|".join(row[3:])
            prev = out.get(number)
            assert prev is None or prev[0] == name, f"type {number} documented as {prev[0]} and {name}"
            fields = set(_IDENT.findall(body)) | (prev[1] if prev else set())
            out[number] = (name, fields)
    return out


def error_table(text: str | None = None) -> dict[int, str]:
    """{code: name} from the error-code table."""
    text = DOC.read_text() if text is None else text
    for header, rows in _tables(text):
        if [h.lower() for h in header[:3]] == ["code", "name", "meaning"]:
            return {int(r[0]): r[1] for r in rows}
    raise AssertionError("docs/protocol.md has no error-code table")


def section(title: str, text: str | None = None) -> str:
    """The text of the `## title` section."""
    text = DOC.read_text() if text is None else text
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, f"docs/protocol.md has no section {title!r}"
    return m.group(1)
