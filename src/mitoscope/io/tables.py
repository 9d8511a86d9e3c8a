"""CSV files with a header row: the labels CSV (:func:`mitoscope.io.load_labelled_images`) and
the true cell boxes (:func:`mitoscope.localization.load_boxes`) are read alike, with the same
one-line errors naming the file and the line."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, one_line

__all__ = ["CsvTable", "read_csv_table"]


@dataclass(frozen=True)
class CsvTable:
    """A CSV's header and its rows with their line numbers (blank rows left out)."""

    path: Path
    header: list[str]
    rows: list[tuple[int, list[str]]]

    @property
    def columns(self) -> dict[str, int]:
        """Header name (stripped, lower case) -> its first column."""
        return {name.strip().lower(): index for index, name in reversed(list(enumerate(self.header)))}

    def column(self, *names: str) -> int | None:
        """The column of the first of ``names`` (lower case) the header has, or None."""
        columns = self.columns
        return next((columns[name] for name in names if name in columns), None)

    def check_width(self, line: int, row: list[str], needed: int) -> None:
        """Refuse a row without column ``needed``."""
        if len(row) <= needed:
            raise InputError(f"{self.path}: line {line} has {len(row)} fields; expected {len(self.header)} "
                             f"as in the header")

    def cell(self, line: int, row: list[str], column: int) -> str:
        """The row's stripped value in ``column``; an empty one is refused, naming the column."""
        value = row[column].strip()
        if not value:
            raise InputError(f"{self.path}: line {line} has an empty {self.header[column].strip()!r}")
        return value


def read_csv_table(path: str | os.PathLike[str], what: str, expected_header: str) -> CsvTable:
    """Read a CSV (UTF-8, a byte-order mark allowed) with a header row.

    ``what`` names the file in errors (``labels``: "cannot read labels file"); a file without a
    header is refused with "<what> file is empty; expected a header <expected_header>".
    """
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            rows = [(reader.line_num, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"{path}: cannot read {what} file ({one_line(err, None)})") from err
    if header is None or not any(cell.strip() for cell in header):
        raise InputError(f"{path}: {what} file is empty; expected a header {expected_header}")
    return CsvTable(path, header, [(line, row) for line, row in rows if any(cell.strip() for cell in row)])
