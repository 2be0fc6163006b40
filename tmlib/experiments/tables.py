"""Tables as a reader of a notebook should see them: at most a screen, readable headers, no index
column, numbers rounded to what they can carry (the long form goes to the CSV)."""

from __future__ import annotations

import math
import numbers
from typing import Any

import pandas as pd

__all__ = ["format_number", "table"]


def format_number(value: Any, digits: int = 3) -> str:
    """A cell as text: integers (also integer-valued floats such as a width 64.0) without a decimal
    point, other numbers to ``digits`` significant digits (6.77e-15, 0.806; 12346 below a million), NaN as "–",
    booleans and text as they are."""
    if isinstance(value, bool) or value is None:
        return "–" if value is None else str(value)
    if isinstance(value, numbers.Integral):
        return str(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        if math.isnan(value):
            return "–"
        if math.isinf(value):
            return "∞" if value > 0 else "−∞"
        if value.is_integer() and abs(value) < 1e6:
            return str(int(value))
        if 10**digits <= abs(value) < 1e6:  # 12345.6 → "12346", not "1.23e+04"
            return f"{value:.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def _header(column: Any) -> str:
    if isinstance(column, tuple):
        return " · ".join(_header(c) for c in column if str(c))
    return str(column).replace("_", " ")


def table(frame: pd.DataFrame | pd.Series, rows: int = 20, digits: int = 3, csv: str | None = None) -> Any:
    """``frame`` for display in a notebook: a pandas ``Styler`` without the index column (a named
    or non-default index becomes the first columns), headers with spaces for underscores, numbers
    by :func:`format_number`, and at most ``rows`` rows (a caption says how many there are and, with
    ``csv``, where the rest is)."""
    if isinstance(frame, pd.Series):
        frame = frame.to_frame(name=frame.name if frame.name is not None else "value")
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"frame must be a pandas DataFrame or Series, got {type(frame).__name__}")
    shown = frame
    if not isinstance(shown.index, pd.RangeIndex) or any(name is not None for name in shown.index.names):
        shown = shown.reset_index()
    shown = shown.copy()
    shown.columns = [_header(c) for c in shown.columns]
    total = len(shown)
    caption = None
    if total > rows:
        shown = shown.head(rows)
        caption = f"first {rows} of {total} rows" + (f"; all of them in {csv}" if csv else "")
    styler = shown.style.hide(axis="index").format(lambda v: format_number(v, digits))
    if caption:
        styler = styler.set_caption(caption)
    return styler
