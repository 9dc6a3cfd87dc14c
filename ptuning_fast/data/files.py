"""Reading and writing (text, label) examples as JSONL or CSV files."""
from __future__ import annotations

import codecs
import csv
import io
import json
import os
from pathlib import Path

from .._files import write_text

SUFFIXES = (".jsonl", ".json", ".csv")


def _check_path(path, name: str) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`{name}` must be a path (str or os.PathLike), got {type(path).__name__}")
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"`{name}` must end in one of {SUFFIXES} (JSON lines or CSV), got {str(path)!r}")
    return path


def _check_column(column, name: str) -> str:
    if not isinstance(column, str) or not column:
        raise TypeError(f"`{name}` must be a non-empty str, got {column!r}")
    return column


def _read_text(path: Path) -> str:
    """The file's text: UTF-8, with or without the byte-order mark spreadsheets write in front."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        offset = err.start + (len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0)
        line = raw[:offset].count(b"\n") + 1
        raise ValueError(f"{path}: not UTF-8 text: byte {offset} (line {line}) is {raw[offset:offset + 1]!r}; save "
                         "the file as UTF-8") from None


MAX_LABEL_CHARS = 1000  # a class name, not a text


def _shown(value) -> str:
    """``value`` for an error message: its repr, cut to 80 characters."""
    shown = repr(value)
    return shown if len(shown) <= 80 else f"{shown[:77]}..."


def read_examples(path, text_column: str = "text", label_column: str = "label") -> list[dict]:
    """Read ``[{"text": ..., "label": ...}]`` from a JSONL (one object a line) or CSV file, in UTF-8
    (a leading byte-order mark is skipped).

    The columns to read are named by ``text_column`` and ``label_column``; other columns are
    ignored. Texts must be non-empty strings; labels are kept as they are (str, or int in JSONL;
    the training job reads them all as str, so 1 and "1" are one label).
    """
    path = _check_path(path, "path")
    text_column = _check_column(text_column, "text_column")
    label_column = _check_column(label_column, "label_column")
    if not path.is_file():
        raise ValueError(f"`path` {str(path)!r} does not exist or is not a file")

    rows = []
    text = _read_text(path)
    with io.StringIO(text, newline="") as handle:  # newline="": as open() for the csv module
        if path.suffix.lower() == ".csv":
            # The csv module refuses fields over 128 KiB; any field of this file is shorter than the file.
            # (The limit is the module's own: it is only ever raised here, never lowered.)
            csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))
            reader = csv.DictReader(handle)
            for line, row in enumerate(reader, start=2):
                rows.append((line, row))
        else:
            for line, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{line}: not valid JSON ({err.msg})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{line}: each line must be a JSON object, got {type(row).__name__}")
                rows.append((line, row))

    examples = []
    for line, row in rows:
        for column, argument in ((text_column, "text_column"), (label_column, "label_column")):
            if row.get(column) is None:
                raise ValueError(f"{path}:{line}: missing column {column!r} (set with `{argument}`)")
        text, label = row[text_column], row[label_column]
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path}:{line}: column {text_column!r} must be a non-empty string, got {_shown(text)}")
        if isinstance(label, bool) or not isinstance(label, (str, int)) or (isinstance(label, str)
                                                                           and not label.strip()):
            raise ValueError(f"{path}:{line}: column {label_column!r} must be a non-blank string or an int, got "
                             f"{_shown(label)}")
        if len(str(label)) > MAX_LABEL_CHARS:
            raise ValueError(f"{path}:{line}: column {label_column!r} holds a label of {len(str(label))} characters "
                             f"(at most {MAX_LABEL_CHARS}): is it the text column?")
        examples.append({"text": text, "label": label})
    if not examples:
        raise ValueError(f"`path` {str(path)!r} holds no examples")
    return examples


def write_examples(examples, path) -> Path:
    """Write ``[{"text": ..., "label": ...}]`` to ``path`` (JSONL or CSV, from the suffix)."""
    path = _check_path(path, "path")
    if not isinstance(examples, (list, tuple)) or not all(
            isinstance(e, dict) and "text" in e and "label" in e for e in examples):
        raise TypeError("`examples` must be a list of dicts with keys 'text' and 'label'")
    path.parent.mkdir(parents=True, exist_ok=True)
    with io.StringIO(newline="") as handle:
        if path.suffix.lower() == ".csv":
            writer = csv.DictWriter(handle, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows({"text": e["text"], "label": e["label"]} for e in examples)
        else:
            for e in examples:
                handle.write(json.dumps({"text": e["text"], "label": e["label"]}) + "\n")
        write_text(handle.getvalue(), str(path))  # renamed into place
    return path
