"""Local data files, read line by line before `datasets` reads them: a file that cannot be read gets one line.

`datasets` reports a broken JSON Lines or CSV file as three chained tracebacks ending in "An error occurred while
generating the dataset" (datasets 5.x), an empty file as a bare StopIteration, and silently fills the missing
columns of rows whose columns differ from the others' with nulls. `check_data_files` reads each local data file (or
every data file of a folder) once, in order, and stops at the first problem with the file, the line and what is
wrong there: not JSON, cut off (a last line without its end, as a write that was interrupted leaves it), not an
object, other columns than the lines before it, a CSV row with another number of fields than the header, an empty
file, a Parquet file that is not one. Parquet is checked from its footer only.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from optimizer_recipes.core.data.formats import FORMAT_COLUMNS
from optimizer_recipes.core.run.config import DATA_FILE_BUILDERS, ConfigError


def data_files_in(path: Path) -> list[Path]:
    """The file itself, or the data files of a folder (what `load_dataset(folder)` reads), in order."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DATA_FILE_BUILDERS
                  and not any(part.startswith(".") for part in p.relative_to(path).parts))


def check_data_files(dataset_name: str) -> None:
    """One line (ConfigError) for the first local data file that cannot be read as training data."""
    path = Path(dataset_name).expanduser()
    files = data_files_in(path)
    if path.is_dir() and not files:
        raise ConfigError(f"--dataset_name {dataset_name}: the folder holds no data file (one of "
                          f"{', '.join(DATA_FILE_BUILDERS)}); give a data file, or a folder of them")
    for file in files:
        check = {".jsonl": _check_json_lines, ".json": _check_json, ".csv": _check_csv, ".txt": _check_text,
                 ".parquet": _check_parquet}[file.suffix.lower()]
        problem = check(file)
        if problem:
            raise ConfigError(f"--dataset_name: {file}: {problem}")


def _check_json_lines(file: Path) -> str | None:
    with open(file, "rb") as f:  # one line at a time: a file of any size
        return _check_lines(enumerate(f, start=1))


def _check_lines(lines) -> str | None:
    columns, rows = None, 0
    for number, raw in lines:
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            return f"line {number} is not UTF-8 text ({error.reason} at byte {error.start})"
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            if not raw.endswith(b"\n"):  # only the last line can end without one
                return (f"line {number}, the last, is cut off ({error.msg}, column {error.colno}): the file was "
                        "probably not written to the end; write it again, or delete the line")
            return f"line {number} is not JSON ({error.msg}, column {error.colno}): {_preview(text)}"
        if not isinstance(record, dict):
            return f"line {number} is a JSON {type(record).__name__}, expected an object of columns: {_preview(text)}"
        problem = _same_columns(columns, record, f"line {number}", last_rows="the lines before it")
        if problem:
            return problem
        columns = _format_columns(record) if columns is None else columns
        rows += 1
    return None if rows else "is empty (no JSON object in it); give a file with one JSON object per line"


def _check_json(file: Path) -> str | None:
    """A .json file: one JSON array of objects, or JSON Lines (both are what the json builder reads)."""
    text = file.read_bytes()
    if not text.strip():
        return "is empty; give a JSON array of objects, or one JSON object per line"
    try:
        document = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _check_json_lines(file)  # not one document: JSON Lines, checked line by line
    if isinstance(document, dict):  # one line: JSON Lines of one row; over several lines: one pretty-printed object
        return None if not text.strip().count(b"\n") else (
            "holds one JSON object over several lines; expected an array of objects (one per row), or one object "
            "per line")
    if not isinstance(document, list):
        return f"holds a JSON {type(document).__name__}; expected an array of objects, or one object per line"
    if not document:
        return "holds an empty array: no rows"
    columns = None
    for number, record in enumerate(document, start=1):
        if not isinstance(record, dict):
            return f"element {number} of the array is a JSON {type(record).__name__}, expected an object of columns"
        problem = _same_columns(columns, record, f"element {number}", last_rows="the elements before it")
        if problem:
            return problem
        columns = _format_columns(record) if columns is None else columns
    return None


def _same_columns(columns: list[str] | None, record: dict, where: str, last_rows: str) -> str | None:
    """None if this row has the format columns the first one had (other columns, an id or Alpaca's optional input,
    may come and go: datasets fills them with null)."""
    if columns is None or _format_columns(record) == columns:
        return None
    return (f"{where} has the columns {', '.join(_format_columns(record)) or '(none)'}, {last_rows} "
            f"{', '.join(columns) or '(none)'}; every row needs the same format's columns")


def _format_columns(record: dict) -> list[str]:
    return sorted(column for column in record if column in FORMAT_COLUMNS)


def _check_csv(file: Path) -> str | None:
    try:
        with open(file, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                return "is empty; give a CSV file with a header line and one row per line"
            rows = 0
            for row in reader:
                if not row:
                    continue
                if len(row) != len(header):
                    return (f"line {reader.line_num} has {len(row)} fields, the header ({', '.join(header)}) "
                            f"{len(header)}; quote fields that hold commas")
                rows += 1
    except UnicodeDecodeError as error:
        return f"is not UTF-8 text ({error.reason} at byte {error.start})"
    except csv.Error as error:
        return f"cannot be read as CSV ({error})"
    return None if rows else "has a header and no rows"


def _check_text(file: Path) -> str | None:
    empty = True
    with open(file, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as error:
                return f"line {number} is not UTF-8 text ({error.reason})"
            empty = empty and not raw.strip()
    return "is empty; give a text file with one document per line" if empty else None


def _check_parquet(file: Path) -> str | None:
    import pyarrow.parquet as pq

    try:
        rows = pq.ParquetFile(file).metadata.num_rows
    except Exception as error:  # pyarrow raises ArrowInvalid, OSError, ... for files that are not Parquet
        return f"cannot be read as Parquet ({str(error).splitlines()[0] if str(error) else type(error).__name__})"
    return None if rows else "holds no rows"


def _preview(text: str, width: int = 60) -> str:
    text = text.strip()
    return repr(text if len(text) <= width else text[:width] + "...")
