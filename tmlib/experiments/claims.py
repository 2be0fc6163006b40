"""The claims a notebook asserts, with what was measured, its interval and a verdict.

Each notebook ends by adding its claims to a :class:`Claims`: the paper, the claim as asserted on
this run's numbers, the measured value with its interval, whether it holds, and the verdict on the
paper's claim ("reproduced", "partly", "not reproduced", "needs CIFAR10", "needs a GPU"). A claim
that does not reproduce is asserted as what the data show, with the verdict "not reproduced".
:meth:`Claims.finish` writes the notebook's rows of ``figures/claims.csv`` (the README's table of
claims is made from it) and raises, listing every claim that does not hold.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from ..paths import resolve
from .records import _locked, provenance, save_csv

__all__ = ["CLAIMS_CSV", "VERDICTS", "Claim", "ClaimError", "Claims", "claims_markdown", "format_interval"]

CLAIMS_CSV = "claims.csv"
VERDICTS = ("reproduced", "partly", "not reproduced", "needs CIFAR10", "needs a GPU", "check")


class ClaimError(AssertionError):
    """A claim asserted by a notebook does not hold on the numbers it just computed."""


@dataclass
class Claim:
    notebook: str
    paper: str
    claim: str
    value: float
    low: float | None
    high: float | None
    holds: bool
    verdict: str
    measured: str


def format_interval(value: float, low: float | None = None, high: float | None = None, digits: int = 3) -> str:
    """``0.123 [0.101, 0.145]`` (or the value alone without an interval)."""
    fmt = f"{{:.{digits}g}}" if abs(value) and (abs(value) < 10 ** -(digits - 1) or abs(value) >= 10 ** 4) else \
        f"{{:.{digits}f}}"
    text = fmt.format(value)
    if low is not None and high is not None and math.isfinite(low) and math.isfinite(high):
        text += f" [{fmt.format(low)}, {fmt.format(high)}]"
    return text


class Claims:
    """Collects a notebook's claims; ``finish()`` records them and asserts them.

    Args:
        notebook: e.g. ``"01_validation"``.
        profile: the run's profile (provenance of ``claims.csv``).
        figures_dir: where ``claims.csv`` lives.
        enforce: raise :class:`ClaimError` in ``finish()`` when a claim does not hold.
    """

    def __init__(self, notebook: str, profile: str, figures_dir: str | os.PathLike = "figures", enforce: bool = True):
        self.notebook, self.profile, self.enforce = notebook, profile, enforce
        self.figures_dir = resolve(figures_dir)
        self.claims: list[Claim] = []

    def add(self, paper: str, claim: str, value: float, low: float | None = None, high: float | None = None, *,
            holds: bool, verdict: str = "reproduced", measured: str | None = None) -> Claim:
        """Record one claim. ``value`` with ``[low, high]`` (e.g. a 95 % interval) is what was
        measured; ``holds`` whether the claim, as written, is true of it."""
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
        value = float(value)
        low = None if low is None else float(low)
        high = None if high is None else float(high)
        item = Claim(self.notebook, paper, claim, value, low, high, bool(holds), verdict,
                     measured or format_interval(value, low, high))
        self.claims.append(item)
        return item

    def table(self) -> pd.DataFrame:
        frame = pd.DataFrame([asdict(c) for c in self.claims])
        if frame.empty:
            return frame
        return frame[["paper", "claim", "measured", "holds", "verdict"]]

    def finish(self) -> pd.DataFrame:
        """Write this notebook's rows of ``claims.csv``; raise if a claim does not hold (enforce)."""
        path = self.figures_dir / CLAIMS_CSV
        rows = pd.DataFrame([asdict(c) for c in self.claims])
        with _locked(path):
            if path.exists():
                old = pd.read_csv(path)
                old = old[old["notebook"] != self.notebook].drop(
                    columns=[c for c in provenance(self.profile) if c in old])
                rows = pd.concat([old, rows], ignore_index=True) if len(old) else rows
            if len(rows):
                rows = rows.sort_values("notebook", kind="stable").reset_index(drop=True)
                save_csv(rows, path, self.profile)
        failed = [c for c in self.claims if not c.holds]
        if failed and self.enforce:
            lines = [f"[{c.paper}] {c.claim}: measured {c.measured}" for c in failed]
            raise ClaimError(f"{self.notebook}: {len(failed)} claim(s) do not hold:\n  " + "\n  ".join(lines))
        return self.table()


def claims_markdown(figures_dir: str | os.PathLike = "figures") -> str:
    """The README's table of claims, from ``claims.csv``."""
    frame = pd.read_csv(Path(resolve(figures_dir)) / CLAIMS_CSV)
    lines = ["| paper | claim | notebook | measured (95 % interval) | verdict |", "|---|---|---|---|---|"]
    for _, row in frame.iterrows():
        lines.append(f"| {row['paper']} | {row['claim']} | {row['notebook']} | {row['measured']} | {row['verdict']} |")
    return "\n".join(lines)
