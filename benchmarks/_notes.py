"""Hand-written notes in generated docs: text between ``<!-- notes -->`` and ``<!-- /notes -->``
survives a benchmark regenerating its page (the reading of the numbers is written by a person)."""

from __future__ import annotations

from pathlib import Path

NOTES_START, NOTES_END = "<!-- notes -->", "<!-- /notes -->"


def keep_notes(path: Path) -> str:
    """The notes block of ``path`` (an empty one if the page or its block is missing)."""
    if not path.is_file():
        return f"{NOTES_START}\n{NOTES_END}"
    text = path.read_text()
    if NOTES_START in text and NOTES_END in text:
        return text[text.index(NOTES_START) : text.index(NOTES_END) + len(NOTES_END)]
    return f"{NOTES_START}\n{NOTES_END}"
