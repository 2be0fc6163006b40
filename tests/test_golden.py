"""Every measure family keeps its numbers: golden values (float64 model and samples, written at
1ddcd31, after the measure architecture's rewrite had been checked against its base commit
f1074ee), recomputed now, compared to rel 1e-12 (tests/golden/make_golden.py)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "golden"))
import make_golden  # noqa: E402

from tmlib.measures.moments import numba_available  # noqa: E402


@pytest.mark.skipif(not numba_available(), reason="the golden file holds numba-backend values too")
def test_every_family_reproduces_the_base_commit_numbers():
    expected = make_golden.load(Path(__file__).parent / "golden" / "golden_1ddcd31.npz")
    problems = make_golden.compare(expected, make_golden.golden_values(), rtol=1e-12)
    assert not problems, "\n".join(problems[:40])
