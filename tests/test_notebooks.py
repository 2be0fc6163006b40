"""Every notebook runs end to end (papermill, the venv's own kernel) with its smallest parameters."""

import json
from pathlib import Path

import pandas as pd
import pytest

from tmlib.paths import project_root
from tmlib.reproduce import NOTEBOOKS

papermill = pytest.importorskip("papermill")

ROOT = project_root(Path(__file__).parent)

# The smallest parameters of each notebook: seconds on 2 cores, still real data and real training.
TINY = {"n_train": 200, "epochs": 1, "n_samples": 20, "n_test": 100, "check_claims": False, "progress": False}
SMALLEST = {
    "00_quickstart": {**TINY, "n_train": 400, "n_rotations": 4},
    "01_validation": {**TINY, "transformations": ["rotation", "translation"], "n_seeds": 2},
    "02_random_init": {**TINY, "n_seeds": 2, "n_dataset_seeds": 2, "transformations": ["rotation", "scale"]},
    "03_dataset_transformation": {**TINY, "datasets": ["mnist", "fashion-mnist", "cifar10"],
                                  "transformations": ["rotation", "scale"], "complexity_fractions": [1, 0.5],
                                  "n_seeds": 2},
    "04_model_comparison": {**TINY, "architectures": ["SimpleConv", "ResNet", "TIPooling"]},
    "05_sample_size": {k: v for k, v in TINY.items() if k != "n_samples"}
    | {"sizes": [4, 8], "n_repeats": 2, "reference": [16, 8], "untrained_repeats": 2},
    "06_architecture": {**TINY, "variants": ["base", "batch norm"], "n_seeds": 2},
    "07_measure_comparison": {**TINY, "firing_rates": [0.1], "n_seeds": 2, "blocks": 2},
    "08_same_equivariance": {**TINY, "transformations": ["rotation", "translation"], "n_seeds": 2, "blocks": 2},
    "09_kvinge": {**TINY, "n_seeds": 2, "steerable_fields": [2, 2, 4]},
    "10_liegg": {"n_train": 300, "epochs": 1, "n_samples": 20, "n_test": 100, "depths": [1, 2], "widths": [8, 16],
                 "reference": [2, 16], "n_seeds_reference": 2, "check_claims": False, "progress": False},
    "11_lie_derivative": {"n_train": 200, "epochs": 1, "n_samples": 20, "n_test": 100, "n_seeds": 2,
                          "check_claims": False, "progress": False},
    "12_explorer": {"n_train": 200, "epochs": 1, "n_samples": 20, "n_test": 100, "n_rotations": 4, "max_st_samples": 8,
                    "report_layers": ["conv0", "fc1"], "check_claims": False, "progress": False},
}


def test_every_notebook_has_smallest_parameters():
    on_disk = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))
    assert on_disk == sorted(NOTEBOOKS) == sorted(SMALLEST)


def _execute(name, tmp_path):
    params = {
        **SMALLEST[name],
        "figures_dir": str(tmp_path / "figures"),
        "models_dir": str(tmp_path / "models"),
        "results_dir": str(tmp_path / "results"),
    }
    out = tmp_path / f"{name}.ipynb"
    papermill.execute_notebook(str(ROOT / "notebooks" / f"{name}.ipynb"), str(out), parameters=params,
                               cwd=str(ROOT), progress_bar=False, kernel_name="python3")
    return out


# What each notebook must write into figures/ (besides its checks inside the notebook).
FIGURES = {
    "01_validation": ["01_validation.png", "01_validation.csv", "01_during_training.png"],
    "02_random_init": ["02_random_init.png", "02_random_init.csv"],
    "03_dataset_transformation": ["03_dataset_transformation.png", "03_dataset_transformation.csv", "03_diversity.png",
                                  "03_complexity.png"],
    "04_model_comparison": ["04_model_comparison.png", "04_model_comparison.csv", "04_table_2019.csv"],
    "05_sample_size": ["05_sample_size.png", "05_sample_size.csv", "05_sample_size_errors.csv"],
    "06_architecture": ["06_architecture.png", "06_architecture.csv", "06_effects.csv"],
    "07_measure_comparison": ["07_measure_comparison.png", "07_measure_comparison.csv", "07_goodfellow_sweep.png",
                              "07_separation.png", "07_separation.csv", "07_goodfellow_sweep.csv"],
    "08_same_equivariance": ["08_same_equivariance.png", "08_same_equivariance.csv",
                             "08_difference_from_untrained.png", "08_difference_from_untrained.csv"],
    "10_liegg": ["10_liegg.png", "10_liegg.csv", "10_liegg_generator.png"],
    "11_lie_derivative": ["11_lie_derivative.png", "11_lie_derivative_absolute.png", "11_lie_derivative.csv"],
    "12_explorer": ["12_explorer.png", "12_explorer.html"],
}


def _claims(figures, notebook):
    claims = pd.read_csv(figures / "claims.csv")
    return claims[claims["notebook"] == notebook]


def _check_sample_size(figures):
    errors = pd.read_csv(figures / "05_sample_size_errors.csv")
    assert set(errors["model"]) == {"rotation", "untrained"} and len(errors) == 2 * 2 * 2
    assert (errors["repeats"] == 2).all() and errors["error"].between(0, 1).all() and errors["se"].notna().all()
    nv = pd.read_csv(figures / "05_sample_size.csv")
    assert {"n", "m", "NV", "layer", "repeat", "model"} <= set(nv.columns)
    assert len(_claims(figures, "05_sample_size")) == 2  # the slopes along n and along m
    assert len(pd.read_csv(figures / "05_sample_size_trend.csv")) == 2


def _check_measure_comparison(figures):
    sep = pd.read_csv(figures / "07_separation.csv")
    assert set(sep["measure"]) == {"NV", "ND²", "ND", "ANOVA", "Goodfellow"} and len(sep) == 10
    assert sep["z (seeds)"].notna().all()
    assert sep["z (seeds + jackknife), last quarter"].notna().sum() == 6  # NV, ND², ANOVA × 2
    sweep = pd.read_csv(figures / "07_goodfellow_sweep.csv")
    assert set(sweep["firing_rate"]) == {0.01, 0.1} and set(sweep["seed"]) == {0, 1}
    assert len(_claims(figures, "07_measure_comparison")) >= 2


def _check_same_equivariance(figures):
    reg = pd.read_csv(figures / "08_regressors.csv")
    assert len(reg) == 4 and set(reg["unit"]) == {"°", "px"} and reg["median error"].gt(0).all()
    assert (reg["images trained"] == 200).all()
    diff = pd.read_csv(figures / "08_difference_from_untrained.csv")
    assert set(diff["measure"]) == {"NVSE", "DSES"} and not {"fc0", "fc1"} & set(diff["layer"])
    assert diff["low"].le(diff["value"]).all() and diff["high"].ge(diff["value"]).all()
    frame = pd.read_csv(figures / "08_same_equivariance.csv")
    assert set(frame["training"]) == {"regressor", "untrained"}
    assert len(_claims(figures, "08_same_equivariance")) == 2 * 2 + 2 + 1  # change, rise; floors; symmetric conv


MEASUREMENT_CHECKS = {"05_sample_size": _check_sample_size, "07_measure_comparison": _check_measure_comparison,
                      "08_same_equivariance": _check_same_equivariance}


@pytest.mark.notebook
@pytest.mark.parametrize("name", sorted(FIGURES))
def test_experiment_notebook(name, tmp_path):
    executed = _execute(name, tmp_path)
    text = executed.read_text()
    if name == "03_dataset_transformation" and not (ROOT / "data" / "cifar-10-batches-py").exists():
        assert "skipped: cifar10" in text and "cifar-10-batches-py" in text  # said, not silent
    if name == "03_dataset_transformation":  # the introduction's point, with this run's numbers
        assert "untrained NV (mean over layers), rotation: " in text and " on the widest range, " in text
    for filename in FIGURES[name]:  # a figure is a real image; a table has a header and a row
        assert (tmp_path / "figures" / filename).stat().st_size > (1000 if filename.endswith(".png") else 150), filename
    summary = json.loads((tmp_path / "results" / "summaries" / f"quick-{name}.json").read_text())
    assert summary["key"]
    if name == "12_explorer":  # the static report: the overview of every measure, one image per layer
        html = (tmp_path / "figures" / "12_explorer.html").read_text()  # asked for, the inputs; nothing remote
        assert html.count('src="data:image/png;base64,') == len(SMALLEST[name]["report_layers"]) + 2
        assert "https://" not in html.split("<style")[0] and "<script src=" not in html
    if name in MEASUREMENT_CHECKS:
        MEASUREMENT_CHECKS[name](tmp_path / "figures")
    if name in ("10_liegg", "11_lie_derivative"):
        _check_lie_notebook(name, tmp_path / "figures")
    frame = pd.read_csv(tmp_path / "figures" / FIGURES[name][1]) if FIGURES[name][1].endswith(".csv") else None
    if frame is not None:
        assert {"layer", "value"} <= set(frame.columns) or {"n", "m", "NV"} <= set(frame.columns)
        assert len(frame) > 0
        assert {"tmlib_version", "git_commit", "torch_version", "profile"} <= set(frame.columns)  # provenance
    _check_records(name, tmp_path / "figures")


def _check_records(name, figures):
    """models.csv has a row per trained model of the notebook (if it trains any); claims.csv its claims."""
    from tmlib.experiments import DESIGNS, design

    if name not in DESIGNS:
        return
    d = design(name, "quick", **{k: v for k, v in SMALLEST[name].items() if k not in ("check_claims", "progress")})
    trained = {label for label, spec in {**d.models, **{k: s for k, (_, s) in d.pretrained.items()}}.items()
               if spec.trained}
    if trained:
        models = pd.read_csv(figures / "models.csv")
        assert set(models[models.notebook == name]["model"]) == trained
        assert models["floor"].notna().all() or (models["task"] != "classify").any()
    claims = pd.read_csv(figures / "claims.csv")
    mine = claims[claims.notebook == name]
    assert len(mine) > 0 and mine["verdict"].notna().all() and mine["measured"].str.len().gt(0).all()


@pytest.mark.notebook
def test_kvinge_notebook(tmp_path):
    from tmlib import data

    executed = _execute("09_kvinge", tmp_path).read_text()
    figures = tmp_path / "figures"
    assert (figures / "09_kvinge_a.png").stat().st_size > 10_000
    tidy = pd.read_csv(figures / "09_kvinge.csv")
    seeds = SMALLEST["09_kvinge"]["n_seeds"]
    steerable = tidy[tidy["model_label"].str.startswith("steerable")]
    assert steerable["model_label"].nunique() == 2 * seeds  # trained and untrained, every seed
    # Invariance and equivariance by construction hold after any training, even one tiny epoch.
    head = steerable[steerable["layer"].isin(["gpool", "gap", "fc0", "fc0act", "fc1"])]
    assert (head[head["measure"] == "GEED-inv[cosine,False]"]["value"] < 1e-5).all()
    assert (steerable[steerable["measure"] == "GEED-eq[cosine,custom]"]["value"] < 1e-5).all()
    plain = tidy[tidy["model_label"].str.startswith("mnist plain")]
    assert (plain[plain["measure"] == "GEED-inv[cosine,False]"]["value"] > 1e-4).all()
    assert {"se", "low", "high"} <= set(tidy.columns) and tidy["se"].notna().all()
    a = pd.read_csv(figures / "09_kvinge_a.csv")
    assert {"untrained SimpleConv", "plain CNN", "CNN + C4 augmentation", "augmented − plain"} <= set(a["label"])
    assert ((a["low"] <= a["value"] + 1e-12) & (a["value"] <= a["high"] + 1e-12)).all()
    models = pd.read_csv(figures / "models.csv")
    assert len(models) == seeds * (7 if data.available("fashion-mnist", ROOT / "data")[0] else 3)
    claims = pd.read_csv(figures / "claims.csv")
    assert (claims["notebook"] == "09_kvinge").all() and len(claims) >= 6
    assert claims.loc[claims["claim"].str.contains("steerable"), "holds"].all()
    if data.available("fashion-mnist", ROOT / "data")[0]:
        for name in ("09_kvinge_b.png", "09_kvinge_c.png", "09_kvinge_b.csv", "09_kvinge_c.csv"):
            assert (figures / name).stat().st_size > 500, name
        c = pd.read_csv(figures / "09_kvinge_c.csv")
        assert len(c) == 4 and set(c["measured on"]) == {"mnist", "fashion-mnist"}
        assert ((c["low"] <= c["relative gain"]) & (c["relative gain"] <= c["high"])).all()
    else:
        assert "parts (b) and (c) are skipped" in executed


def test_cifar_absence_is_explained(tmp_path):
    from tmlib import data

    ok, why = data.available("cifar10", tmp_path)
    assert not ok and "cifar-10-batches-py" in why and str(tmp_path) in why and "download=True" in why


@pytest.mark.notebook
def test_quickstart_notebook(tmp_path):
    _execute("00_quickstart", tmp_path)
    assert (tmp_path / "figures" / "00_quickstart_nv.png").stat().st_size > 10_000
    frame = pd.read_csv(tmp_path / "figures" / "00_quickstart_nv.csv")
    assert set(frame["training"]) == {"untrained", "no augmentation", "rotation augmentation"}
    assert frame["layer"].tolist()[:3] == ["conv0", "act0", "conv1"]
    assert len(frame) == 3 * 15 and frame["value"].between(0, 10).all()
    assert (frame["low"] <= frame["value"]).all() and (frame["value"] <= frame["high"]).all()  # jackknife intervals
    summary = json.loads((tmp_path / "results" / "summaries" / "quick-00_quickstart.json").read_text())
    assert summary["key"] == "last-quarter NV, augmented − plain" and isinstance(summary["value"], float)
    assert len(list((tmp_path / "models").glob("SimpleConv-*.pt"))) == 2
    _check_records("00_quickstart", tmp_path / "figures")


def _check_lie_notebook(name, figures):
    """Numbers and shapes of notebooks 10 and 11 at their smallest parameters."""
    claims = pd.read_csv(figures / "claims.csv")
    mine = claims[claims["notebook"] == name]
    if name == "10_liegg":
        table = pd.read_csv(figures / "10_liegg.csv")
        # 2 depths × 2 widths × (rotation, upright, untrained), and a second seed of the reference 2×16.
        assert len(table) == 2 * 2 * 3 + 2 and set(table["training"]) == {"rotation", "none", "untrained"}
        assert table["symmetry_variance"].gt(0).all() and table["symmetry_bias"].between(0, 1).all()
        assert (table["symmetry_variance_low"] <= table["symmetry_variance_high"]).all()
        reference = table[(table["depth"] == 2) & (table["width"] == 16) & (table["training"] != "none")]
        assert reference["published-style pixel_variance"].gt(0).all() and len(reference) == 4
        assert len(pd.read_csv(figures / "10_liegg_trends.csv")) == 7 * 2
        assert len(pd.read_csv(figures / "10_liegg_published.csv")) == 5
        assert len(mine) == 4 + 8 + 2
    else:
        frame = pd.read_csv(figures / "11_lie_derivative.csv")
        assert set(frame["training"]) == {"untrained", "no augmentation", "rotation augmentation"}
        assert set(frame["seed"]) == {0, 1} and frame["generator"].nunique() == 5
        assert frame["layer"].nunique() == 15 and {"index", "depth", "relative_low", "relative_high"} <= set(frame)
        assert (frame["low"] <= frame["value"]).all() and (frame["value"] <= frame["high"]).all()
        profiles = pd.read_csv(figures / "11_lie_derivative_profiles.csv")
        assert len(profiles) == 5 * 2 * 3 * 15 and {"layer", "index", "depth", "value", "low", "high", "label"} <= set(profiles)
        assert len(pd.read_csv(figures / "11_finite_rotations.csv")) == 6 * 3
        assert len(mine) == 2 + 1 + 4 + 1
