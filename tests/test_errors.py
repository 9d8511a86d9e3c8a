"""User-facing errors and the one-line form of a library's message."""

from __future__ import annotations

from mitoscope.errors import InputError, MitoscopeError, one_line


def test_one_line_joins_lines_cuts_and_names_an_empty_error():
    error = OSError("cannot\n  open\tthe   file")
    assert one_line(error) == "cannot open the file"
    assert one_line(error, typed=True) == "OSError: cannot open the file"
    assert one_line(ValueError("x" * 1000)) == "x" * 300
    assert one_line(ValueError("x" * 1000), 20, typed=True) == "ValueError: xxxxxxxx"
    assert len(one_line(ValueError("x" * 1000), None)) == 1000
    assert one_line(RuntimeError()) == "RuntimeError"
    assert one_line(RuntimeError(), typed=True) == "RuntimeError"
    assert one_line("tifffile:\n  page 3 is missing", None) == "tifffile: page 3 is missing"


def test_input_errors_are_mitoscope_errors_and_value_errors():
    assert issubclass(InputError, MitoscopeError) and issubclass(InputError, ValueError)
