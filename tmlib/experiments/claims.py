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
from .records import _locked, save_csv

__all__ = ["CLAIMS_CSV", "OUTCOMES", "VERDICTS", "Claim", "ClaimError", "Claims", "claims_markdown", "format_interval",
           "outcome"]

CLAIMS_CSV = "claims.csv"
VERDICTS = ("reproduced", "partly", "not reproduced", "measured", "needs CIFAR10", "needs a GPU")


#: What a 95 % interval says about the sign of an effect.
OUTCOMES = ("negative", "positive", "none")


def outcome(low: float, high: float) -> str:
    """``"negative"`` (the interval lies below 0), ``"positive"`` (above 0) or ``"none"`` (it
    contains 0, or is not finite)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return "none"
    return "negative" if high < 0 else "positive" if low > 0 else "none"


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
    statement: str = ""  # the claim as the notebook states it (directional claims: before the outcome's words)
    outcome: str = ""  # directional claims: what this run's interval shows (OUTCOMES)
    reference: str = ""  # directional claims: the outcome this run was checked against


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
        self.references = self._references()

    def _references(self) -> dict[str, str]:
        """statement → outcome of this notebook's directional claims in the ``claims.csv`` already
        there (the committed reference run on a fresh clone), for this profile."""
        path = self.figures_dir / CLAIMS_CSV
        if not path.exists():
            return {}
        try:
            old = pd.read_csv(path)
        except (OSError, ValueError, pd.errors.ParserError):
            return {}
        if not {"statement", "reference", "notebook", "profile"} <= set(old.columns):
            return {}
        old = old[(old["notebook"] == self.notebook) & (old["profile"] == self.profile)]
        return {str(row.statement): str(row.reference) for row in old.itertuples()
                if isinstance(row.reference, str) and row.reference in OUTCOMES}

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

    def directional(self, paper: str, statement: str, estimate, expected: str = "negative",
                    observed: str | None = None, verdict: str | None = None) -> Claim:
        """A claim about the sign of an effect the paper predicts (``expected``: ``"negative"`` or
        ``"positive"``), recorded as what the 95 % interval of ``estimate`` (an object with
        ``value``, ``low``, ``high``) shows: on the predicted side of 0 → the statement itself,
        verdict "reproduced"; on the other side → "contradicted", and containing 0 → "not
        detected", both "not reproduced" (``verdict`` overrides).

        ``expected="nonzero"`` is a claim that an effect exists, whatever its sign (e.g. "the
        profile differs between datasets").

        The claim holds when this run's outcome is the *reference* outcome: ``observed`` if given
        (:data:`OUTCOMES`), else the outcome recorded for the same statement, notebook and profile
        in the ``claims.csv`` already in ``figures_dir`` — on a fresh clone, the committed reference
        run's. A change of result therefore fails the notebook instead of rewriting its claim, and
        the reference stays what it was (it is written back unchanged). Without any reference (new
        settings, a new claim) the claim records its outcome and holds."""
        if expected not in ("negative", "positive", "nonzero"):
            raise ValueError(f"expected must be 'negative', 'positive' or 'nonzero', got {expected!r}")
        if observed is not None and observed not in OUTCOMES:
            raise ValueError(f"observed must be one of {OUTCOMES} or None, got {observed!r}")
        low, high = float(estimate.low), float(estimate.high)
        found = outcome(low, high)
        if found == expected or (expected == "nonzero" and found != "none"):
            text, default = statement, "reproduced"
        elif found == "none":
            text, default = f"{statement} — not detected: the 95 % interval contains 0", "not reproduced"
        else:
            text, default = f"{statement} — contradicted: the 95 % interval excludes 0 on the other side", \
                "not reproduced"
        reference = observed if observed is not None else self.references.get(statement)
        if reference is not None and found != reference:
            text += f" (the reference run found: {reference})"
        item = self.add(paper, text, estimate.value, low, high, holds=reference is None or found == reference,
                        verdict=verdict or default)
        item.statement, item.outcome, item.reference = statement, found, reference or found
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
                old = old[old["notebook"] != self.notebook]
                rows = pd.concat([old, rows], ignore_index=True) if len(old) else rows
            if len(rows):
                rows = rows.sort_values("notebook", kind="stable").reset_index(drop=True)
                save_csv(rows, path, self.profile, keep=True)
        failed = [c for c in self.claims if not c.holds]
        if failed and self.enforce:
            lines = [f"[{c.paper}] {c.claim}: measured {c.measured}" for c in failed]
            raise ClaimError(f"{self.notebook}: {len(failed)} claim(s) do not hold:\n  " + "\n  ".join(lines))
        return self.table()


def claims_markdown(figures_dir: str | os.PathLike = "figures") -> str:
    """The README's table of claims, from ``claims.csv``."""
    frame = pd.read_csv(Path(resolve(figures_dir)) / CLAIMS_CSV)
    lines = ["| paper | claim | notebook | measured (95 % interval) | holds | verdict |", "|---|---|---|---|---|---|"]
    for _, row in frame.iterrows():
        claim = str(row["claim"]).replace("|", "\\|")  # a table cell: escape the pipes of |log scale|
        holds = "yes" if str(row["holds"]).lower() == "true" else "**no**"
        lines.append(f"| {row['paper']} | {claim} | {row['notebook']} | {row['measured']} | {holds} | {row['verdict']} |")
    return "\n".join(lines)
