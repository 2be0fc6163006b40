"""Several results in one file: tmlib.results.save_results / load_results, and MeasureResult.load of both kinds."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tmlib.results import MeasureResult, load_results, save_results

# ------------------------------------------------------------------------------ several results in one file


def _result(name: str, seed: int, per_class: bool = False) -> MeasureResult:
    rng = np.random.default_rng(seed)
    values = {"conv": rng.random((2, 3, 3)), "fc": rng.random(4)}
    replicates = pd.DataFrame(rng.random((3, 2)), columns=list(values)).rename_axis("block")
    classes = {label: _result(f"{name}-{label}", seed + 10 + label) for label in (0, 1)} if per_class else None
    return MeasureResult(name, values, {"mode": "element", "n": 6}, {"conv": {"raw": 0.5}, "fc": {"raw": 0.25}},
                         replicates, classes)


def test_save_results_and_load_results_round_trip(tmp_path):
    results = {"NV": _result("NV", 0, per_class=True), "my tv": _result("TV[channel,std]", 1)}
    path = save_results(results, tmp_path / "both.npz")
    assert oct(path.stat().st_mode & 0o777) == "0o644" and not list(tmp_path.glob(".*tmp"))
    back = load_results(path)
    assert list(back) == ["NV", "my tv"] and back["my tv"].measure == "TV[channel,std]"
    for name, want in results.items():
        pd.testing.assert_frame_equal(back[name].to_frame(), want.to_frame())
        pd.testing.assert_frame_equal(back[name].replicates, want.replicates)
        assert back[name].metadata == want.metadata and back[name].layer_metadata == want.layer_metadata
    assert list(back["NV"].per_class) == [0, 1] and not back["my tv"].per_class
    pd.testing.assert_frame_equal(back["NV"].per_class_frame(), results["NV"].per_class_frame())
    np.testing.assert_array_equal(MeasureResult.load(path, measure="my tv")["conv"], results["my tv"]["conv"])
    with pytest.raises(ValueError, match=r"holds no result 'TV'; its results: 'NV', 'my tv'"):
        MeasureResult.load(path, measure="TV")
    with pytest.raises(ValueError, match="holds 2 results"):
        MeasureResult.load(path)
    one = save_results({"only": _result("only", 2)}, tmp_path / "one.npz")
    assert MeasureResult.load(one).measure == "only"
    with pytest.raises(ValueError, match="nothing to save"):
        save_results({}, tmp_path / "none.npz")
    with pytest.raises(TypeError, match=r"results\['x'\] must be a MeasureResult"):
        save_results({"x": 1}, tmp_path / "bad.npz")


def test_a_file_of_one_result_loads_as_before(tmp_path):
    result = _result("NV[element,std]", 3, per_class=True)
    path = result.save(tmp_path / "single.npz")
    for back in (MeasureResult.load(path), MeasureResult.load(path, measure="NV[element,std]"),
                 load_results(path)["NV[element,std]"]):
        pd.testing.assert_frame_equal(back.to_frame(), result.to_frame())
        assert list(back.per_class) == [0, 1]
    with pytest.raises(ValueError, match="holds no result 'NV'"):
        MeasureResult.load(path, measure="NV")
