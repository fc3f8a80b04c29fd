"""Writing a benchmark's table into docs/benchmarks.md between its markers."""

from __future__ import annotations

from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def write_block(name: str, heading: str, text: str, docs: Path = DOCS) -> None:
    """Replace what lies between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``
    with ``text``; append a section with ``heading`` if the markers are not there yet."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    doc = docs.read_text()
    block = f"{begin}\n{text}\n{end}"
    if begin in doc:
        doc = doc.split(begin)[0] + block + doc.split(end, 1)[1]
    else:
        doc += f"\n## {heading}\n\n{block}\n"
    docs.write_text(doc)
