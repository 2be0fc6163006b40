"""The command line (`python -m tmlib measure`) and the several-results files it writes
(tmlib.results.save_results / load_results). A tiny MNIST-shaped cache stands in for the real data."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tmlib import cli, data, models, train, transforms
from tmlib.measures import NormalizedVariance, SampleVariance, TransformationVariance, evaluate
from tmlib.results import MeasureResult, load_results, save_results

REPO = Path(__file__).resolve().parents[1]
SMALL = '{"filters": 2, "fc_units": 8}'  # an untrained SimpleConv small enough for a test


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A data folder holding a 40-image "mnist" (both splits) in the layout tmlib.data caches."""
    folder = tmp_path / "data" / "mnist"
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    for split in data.SPLITS:
        images = torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8, generator=gen)
        torch.save({"images": images, "labels": torch.arange(40) % 10, "source": "test", "sha256": None},
                   folder / f"{split}.pt")
    return folder.parent


def _argv(root: Path, out: Path, *extra: str, measures: str = "NV,TV,SV") -> list[str]:
    return ["measure", "--model", "SimpleConv", "--model-args", SMALL, "--dataset", "mnist", "--data-root",
            str(root), "--n", "6", "--transformation", "rotation", "--m", "4", "--measures", measures,
            "--out", str(out), "--no-progress", *extra]


def _direct(model, root: Path, measures: dict, n: int = 6, ts=None) -> dict:
    x = data.load("mnist", "test", n=n, root=root, download=False)
    return evaluate(model, x, ts or transforms.rotations(4), measures, progress=False)


def _simple_conv(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return models.build("SimpleConv", in_channels=1, num_classes=10, image_size=28, filters=2, fc_units=8)


def _assert_same(got: MeasureResult, want: MeasureResult) -> None:
    assert got.layer_names == want.layer_names
    for layer in want:
        np.testing.assert_allclose(got[layer], want[layer], rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------ a run, its files


def test_the_files_hold_what_evaluate_gives(root, tmp_path, capsys):
    out = tmp_path / "results" / "nv.npz"
    assert cli.main(_argv(root, out, "--mode", "channel")) == 0
    want = _direct(_simple_conv(), root, {"NV": NormalizedVariance(mode="channel"),
                                          "TV": TransformationVariance(mode="channel"),
                                          "SV": SampleVariance(mode="channel")})
    for name in ("NV", "TV", "SV"):
        _assert_same(MeasureResult.load(out, measure=name), want[name])
    assert list(load_results(out)) == ["NV", "TV", "SV"]
    layers = want["NV"].layer_names
    frame = pd.read_csv(out.with_suffix(".csv"))
    assert list(frame.columns) == ["measure", "layer", "index", "depth", "value", "model", "dataset", "transformation"]
    assert frame["measure"].tolist() == [name for name in ("NV", "TV", "SV") for _ in layers]
    assert frame["layer"].tolist() == layers * 3
    np.testing.assert_allclose(frame["value"], np.concatenate([want[k].layer_means() for k in ("NV", "TV", "SV")]),
                               rtol=1e-12)
    assert set(frame["model"]) == {"SimpleConv"} and set(frame["dataset"]) == {"mnist"}
    assert {oct(p.stat().st_mode & 0o777) for p in (out, out.with_suffix(".csv"))} == {"0o644"}
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and f"wrote {out.with_suffix('.csv')}" in printed
    assert all(layer in printed for layer in layers) and "NV" in printed.splitlines()[1]
    with pytest.raises(ValueError, match=r"holds 3 results \('NV', 'TV', 'SV'\): pass measure="):
        MeasureResult.load(out)


def test_options_per_measure_blocks_and_layers(root, tmp_path):
    out = tmp_path / "o.npz"
    argv = _argv(root, out, "--stat", "var", "--blocks", "3", "--layers", "conv0,act4",
                 measures="NV:mode=channel,NV:stat=std,TD:unit=channel,ANOVA:alpha=0.05:bonferroni=false")
    assert cli.main(argv) == 0
    got = load_results(out)
    measures = {"NV[channel,var]": NormalizedVariance(mode="channel", stat="var"), "NV[element,std]": NormalizedVariance(),
                "TD": cli.MEASURES["TD"].cls(unit="channel"), "ANOVA": cli.MEASURES["ANOVA"].cls(0.05, False)}
    x = data.load("mnist", "test", n=6, root=root, download=False)
    want = evaluate(_simple_conv(), x, transforms.rotations(4), measures, layers=["conv0", "act4"], blocks=3,
                    progress=False)
    assert list(got) == list(want)
    for name in want:
        _assert_same(got[name], want[name])
        np.testing.assert_allclose(got[name].replicates.to_numpy(), want[name].replicates.to_numpy(), rtol=1e-12)
    assert got["ANOVA"].metadata["alpha"] == 0.05 and {"se", "low", "high"} <= set(pd.read_csv(out.with_suffix(".csv")))


@pytest.mark.parametrize("kind", ["state dict", "tmlib.train checkpoint"])
def test_a_checkpoint_replaces_the_weights(root, tmp_path, kind):
    trained = _simple_conv(seed=1)  # other weights than the CLI's --seed 0
    path = tmp_path / "weights.pt"
    if kind == "state dict":
        torch.save(trained.state_dict(), path)
    else:
        x = data.load("mnist", "train", n=20, root=root, download=False)
        train.train(trained, x, epochs=1, batch_size=10, cache_dir=tmp_path / "models", progress=False)
        path = Path(trained.training_history["checkpoint"])
        assert {"key", "state_dict", "history"} <= set(torch.load(path, weights_only=True))
    out = tmp_path / "nv.npz"
    assert cli.main(_argv(root, out, "--checkpoint", str(path), measures="NV")) == 0
    want = _direct(trained, root, {"NV": NormalizedVariance()})["NV"]
    _assert_same(MeasureResult.load(out), want)
    assert MeasureResult.load(out).metadata["checkpoint"] == str(path)


def test_a_model_of_your_own(root, tmp_path, monkeypatch):
    (tmp_path / "my_cli_models.py").write_text(
        "import torch\n"
        "def tiny(width=3):\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(1, width, 3), torch.nn.ELU(), torch.nn.Flatten(),\n"
        "                               torch.nn.Linear(width * 26 * 26, 10))\n"
        "def not_a_model():\n"
        "    return 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "own.npz"
    argv = _argv(root, out, measures="NV")
    argv[argv.index("SimpleConv")] = "my_cli_models:tiny"
    argv[argv.index(SMALL)] = '{"width": 2}'
    assert cli.main(argv) == 0
    torch.manual_seed(0)
    import my_cli_models

    want = _direct(my_cli_models.tiny(width=2), root, {"NV": NormalizedVariance()})["NV"]
    _assert_same(MeasureResult.load(out), want)
    assert want.layer_names == ["0", "1", "2", "3"]


# ------------------------------------------------------------------------------ bad arguments


def _mismatched_checkpoint(tmp_path: Path) -> str:
    torch.manual_seed(0)
    path = tmp_path / "big.pt"
    torch.save(models.build("SimpleConv", filters=3, fc_units=8).state_dict(), path)
    return str(path)


BAD = {
    "unknown model": (["--model", "NoSuchNet"], "--model: unknown model 'NoSuchNet'"),
    "unimportable builder": (["--model", "no_such_module_here:build"], "--model no_such_module_here:build: cannot import"),
    "builder returns no module": (["--model", "my_bad_models:three", "--model-args", "{}"],
                                  "--model my_bad_models:three returned int, not a torch.nn.Module"),
    "model args not JSON": (["--model-args", "{filters: 2}"], "argument --model-args: a JSON object"),
    "unknown model arg": (["--model-args", '{"conv_filters": 64}'], "--model-args: SimpleConv takes no conv_filters"),
    "model arg from the data": (["--model-args", '{"in_channels": 3}'], "--model-args: in_channels: set by --dataset"),
    "bad model arg value": (["--model-args", '{"filters": 0}'], "--model-args: filters must be an int >= 1"),
    "unknown measure": (["--measures", "NV,XV"], "argument --measures: unknown measure 'XV'"),
    "unknown measure option": (["--measures", "NV:colour=red"], "argument --measures: NV: 'colour=red' is not key=value"),
    "bad measure option value": (["--measures", "NV:stat=median"], "--measures: NV: stat must be one of"),
    "n < 2": (["--n", "1"], "argument --n/--n-samples: an integer >= 2 is needed, got '1'"),
    "n too large": (["--n", "41"], "--n: n=41 is larger than the test split of mnist (40 images)"),
    "missing checkpoint": (["--checkpoint", "nowhere.pt"], "--checkpoint: no such file nowhere.pt"),
    "checkpoint that does not fit": (["--checkpoint", _mismatched_checkpoint], "does not fit SimpleConv (shapes "
                                     "(file vs model): conv0.weight [3, 1, 3, 3] vs [2, 1, 3, 3]"),
    "unknown dataset": (["--dataset", "imagenet"], "argument --dataset: invalid choice: 'imagenet'"),
    "dataset not on disk": (["--dataset", "cifar10"], "--dataset cifar10: CIFAR-10 test split not found"),
    "range option of another set": (["--transformation", "c4", "--degrees", "90"],
                                    "--degrees does not apply to --transformation c4"),
    "m of a fixed set": (["--transformation", "c4", "--m", "5"], "--m: the c4 set has exactly 4 transformations, got 5"),
    "m a scale set cannot have": (["--transformation", "scale", "--m", "6"], "--m: a scale set has m = 1 + 3k"),
    "unknown layer": (["--layers", "conv0,nope"], "layers: unknown layer name 'nope'"),
    "out not .npz": (["--out", "results.txt"], "--out: a path ending in .npz is needed, got 'results.txt'"),
    "distributed outside torchrun": (["--distributed"], "--distributed: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT "
                                                        "not set; launch with `torchrun"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_argument_is_one_line_and_exit_code_2(case, root, tmp_path, capsys, monkeypatch):
    extra, message = BAD[case]
    extra = [e(tmp_path) if callable(e) else e for e in extra]  # files the case needs
    (tmp_path / "my_bad_models.py").write_text("def three():\n    return 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for variable in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(variable, raising=False)
    capsys.readouterr()
    assert cli.main(_argv(root, tmp_path / "out.npz") + extra) == 2  # the last of an option counts
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("tmlib measure: error: ") and message in err, err
    assert not (tmp_path / "out.npz").exists()


def test_help_lists_every_option_measure_and_set(capsys):
    assert cli.main(["measure", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the lines
    parser = cli.build_parser()
    measure = parser._subparsers._group_actions[0].choices["measure"]
    options = [s for action in measure._actions for s in action.option_strings]
    assert len(options) > 25 and all(option in text for option in options)
    assert all(name in text for name in [*cli.MEASURES, *cli.TRANSFORMATIONS])
    assert "fraction of the image size" in text and "degrees" in text and "scale factor" in text
    assert cli.main([]) == 2  # no subcommand: the help, on stderr
    assert "measure" in capsys.readouterr().err


def test_the_sets_the_options_name():
    def ts(name, **options):
        unset = dict.fromkeys(["m", "degrees", "min_scale", "max_scale", "max_shift"])
        return cli.transformation_set(argparse.Namespace(**{**unset, "transformation": name, **options}))

    torch.testing.assert_close(ts("rotation").matrices, transforms.paper_set("rotation").matrices)
    torch.testing.assert_close(ts("scale").matrices, transforms.paper_set("scale").matrices)
    torch.testing.assert_close(ts("translation").matrices, transforms.paper_set("translation").matrices)
    assert len(ts("combined")) == 504 and len(ts("d4")) == 8
    assert [p["degrees"] for p in ts("rotation", m=3, degrees=90).parameters] == [-45, 0, 45]
    assert len(ts("translation", m=5)) == 5 and max(abs(p["tx"]) for p in ts("translation", m=5).parameters) == 0.15


# ------------------------------------------------------------------------------ processes


def test_every_option_gets_through_torchrun():
    """torchrun's own parser reads abbreviations of its options everywhere on its command line: --n and
    --m are ambiguous there, so they have the aliases --n-samples and --n-transformations."""
    from torch.distributed.run import get_args_parser

    measure = cli.build_parser()._subparsers._group_actions[0].choices["measure"]
    options = [s for action in measure._actions for s in action.option_strings if s not in ("--n", "--m")]
    assert {"--n-samples", "--n-transformations"} <= set(options)
    for option in options:
        args = get_args_parser().parse_args(["--nproc_per_node=2", "-m", "tmlib", "measure", option, "1"])
        assert args.training_script == "tmlib" and args.training_script_args == ["measure", option, "1"]


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_the_process_group_and_the_distributed_keyword(monkeypatch):
    with cli.process_group(False) as run:
        assert run == cli.Run()
    for variable, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(variable, value)
    with cli.process_group(None, device="cpu") as run:  # None: WORLD_SIZE = 1 is one process
        assert run.evaluate_kwargs == {} and not torch.distributed.is_initialized()
    monkeypatch.setenv("MASTER_PORT", _free_port())
    with cli.process_group(True, device="cpu") as run:
        assert torch.distributed.is_initialized() and run.rank == 0 and run.world_size == 1
        assert run.evaluate_kwargs == {"distributed": True}
    assert not torch.distributed.is_initialized()


def test_torchrun_with_two_processes_equals_one_process(root, tmp_path):
    """The issue's command under ``torchrun --standalone --nproc_per_node=2`` (gloo): rank 0 writes
    the results of all samples, equal to one process's; every rank's forwards are counted."""
    out = tmp_path / "two" / "r.npz"
    argv = [a.replace("--n", "--n-samples") if a == "--n" else a.replace("--m", "--n-transformations") if a == "--m"
            else a for a in _argv(root, out, "--mode", "channel", "--blocks", "2")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "tmlib", *argv], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.count(f"wrote {out}") == 1  # rank 0 only
    got = MeasureResult.load(out, measure="NV")
    x = data.load("mnist", "test", n=6, root=root, download=False)
    want = evaluate(_simple_conv(), x, transforms.rotations(4), {"NV": NormalizedVariance(mode="channel")},
                    progress=False, blocks=2)["NV"]
    assert got.layer_names == want.layer_names
    for layer in want:
        np.testing.assert_allclose(got[layer], want[layer], rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(got.replicates.to_numpy(), want.replicates.to_numpy(), rtol=1e-9, atol=1e-13)
    assert got.metadata["images_forwarded"] == 6 * 4
    assert got.metadata["distributed"]["world_size"] == 2
    assert got.metadata["distributed"]["rank_samples"] == [3, 3]


def test_python_m_tmlib_measure_end_to_end(root, tmp_path):
    out = tmp_path / "run" / "r.npz"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the same float32 sums as in this process
    done = subprocess.run([sys.executable, "-m", "tmlib", *_argv(root, out, "--mode", "channel")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout and out.with_suffix(".csv").is_file()
    want = _direct(_simple_conv(), root, {"NV": NormalizedVariance(mode="channel")})["NV"]
    _assert_same(MeasureResult.load(out, measure="NV"), want)


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
