"""The reproduction's experiments: profiles and floors, the models (trained to their floor, cached),
what each notebook trains and measures (its design), uncertainty of derived numbers, claims and the
CSVs the notebooks write.

A notebook states *what* it compares; this package knows *how*: ``design = ex.design(notebook,
profile, **parameters)`` gives the models and measurements, ``design.train()`` / ``design.measure()``
run them, :class:`Jack` and :func:`seed_mean` give intervals, :class:`Claims` asserts and records.
"""

from .analysis import (
    Estimate,
    Jack,
    first_quarter,
    last_quarter,
    profile_distance,
    seed_mean,
    seed_profile,
    seed_spread,
    spread_ratio,
)
from .claims import OUTCOMES, ClaimError, Claims, claims_markdown, format_interval, outcome
from .design import Design, Measurement
from .designs import DESIGNS, design
from .measuring import Timer, accuracy_table, geed_measures, measure, measure_geed, tidy, variance_measures
from .notebook import Notebook
from .profiles import (
    FLOORS,
    PROFILES,
    TRANSFORMATIONS,
    augmentation_set,
    default_device,
    floor_for,
    measurement_set,
    profile_settings,
    ranged_set,
    settings,
)
from .records import FloorError, check_floors, model_rows, models_markdown, provenance, record_models, save_csv
from .tables import format_number, table
from .zoo import (
    ModelSpec,
    build_model,
    evaluate_model,
    fine_tuned_model,
    regression_errors,
    snapshot_models,
    spec_dict,
    test_accuracy,
    trained_model,
)

__all__ = [
    "DESIGNS",
    "FLOORS",
    "PROFILES",
    "TRANSFORMATIONS",
    "OUTCOMES",
    "ClaimError",
    "Claims",
    "Design",
    "Estimate",
    "FloorError",
    "Jack",
    "Measurement",
    "ModelSpec",
    "Notebook",
    "Timer",
    "accuracy_table",
    "augmentation_set",
    "build_model",
    "check_floors",
    "claims_markdown",
    "default_device",
    "design",
    "evaluate_model",
    "fine_tuned_model",
    "first_quarter",
    "floor_for",
    "format_interval",
    "outcome",
    "geed_measures",
    "last_quarter",
    "measure",
    "measure_geed",
    "measurement_set",
    "model_rows",
    "models_markdown",
    "profile_settings",
    "profile_distance",
    "provenance",
    "ranged_set",
    "record_models",
    "regression_errors",
    "save_csv",
    "seed_mean",
    "seed_profile",
    "seed_spread",
    "settings",
    "snapshot_models",
    "spec_dict",
    "spread_ratio",
    "table",
    "format_number",
    "test_accuracy",
    "tidy",
    "trained_model",
    "variance_measures",
]
