"""The variance family against brute force and against properties it must have."""

import shutil

import numpy as np
import pytest
import torch
from conftest import CountingModel
from torch import nn

from tmlib import activations
from tmlib import transforms as T
from tmlib.measures import (
    AnovaMeasure,
    NonFiniteActivationError,
    NormalizedDistance,
    NormalizedVariance,
    SampleVariance,
    STMoments,
    TransformationVariance,
    collect,
    evaluate,
)
from tmlib.results import MeasureResult

ALL = [TransformationVariance(mode=mo, stat=st) for mo in ("element", "channel") for st in ("std", "var")]
ALL += [SampleVariance(mode=mo, stat=st) for mo in ("element", "channel") for st in ("std", "var")]
ALL += [NormalizedVariance(mode=mo, stat=st) for mo in ("element", "channel") for st in ("std", "var")]
# Brute force, batch sizes {1, k, n}, numba vs torch, split-and-merge: tests/test_harness.py.


def test_result_shapes_follow_the_contract(small_cnn):
    r = evaluate(small_cnn, torch.randn(6, 1, 8, 8), T.rotations(4),
                 [NormalizedVariance(), NormalizedVariance(mode="channel")], progress=False)
    assert list(r) == ["NV[element,std]", "NV[channel,std]"]
    assert r["NV[element,std]"]["0"].shape == (4, 8, 8)
    assert r["NV[channel,std]"]["0"].shape == (4,)
    assert r["NV[channel,std]"]["6"].shape == (5,)  # no spatial dims: channel = element
    np.testing.assert_array_equal(r["NV[channel,std]"]["6"], r["NV[element,std]"]["6"])


def test_exactly_n_times_m_forwards_whatever_the_number_of_measures(small_cnn):
    model = CountingModel(small_cnn)
    x, ts = torch.randn(10, 1, 8, 8), T.rotations(6)
    r = evaluate(model, x, ts, ALL, batch_size=3, progress=False)
    assert model.images == 10 * 6
    assert next(iter(r.values())).metadata["images_forwarded"] == 60


def test_states_merge_exactly():
    torch.manual_seed(3)
    rows = torch.randn(20, 6, 30) * 3 + 5
    whole = STMoments(6, 30)
    whole.update(rows)
    left, right = STMoments(6, 30), STMoments(6, 30, backend="torch")
    left.update(rows[:7])
    right.update(rows[7:])
    merged = left.merge(right)
    np.testing.assert_allclose(merged.sample(), whole.sample(), rtol=1e-12)
    np.testing.assert_allclose(merged.transformational(), whole.transformational(), rtol=1e-12)
    np.testing.assert_allclose(merged.column_mean(), whole.column_mean(), rtol=1e-12)


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_moments_equal_the_eager_torch_ops(small_cnn):
    # backend="compile": the moments update compiled by torch.compile (one compile with dynamic
    # shapes for every layer and block size, the last block short) against the eager torch ops,
    # the reference; constant units keep NV's exact 0/0 → 1.
    torch.manual_seed(4)
    x, ts = torch.randn(11, 1, 8, 8), T.rotations(5)
    measures = ALL + [AnovaMeasure(), NormalizedDistance()]
    compiled = evaluate(small_cnn, x, ts, measures, batch_size=4, backend="compile", progress=False)
    states = collect(small_cnn, x, ts, measures, batch_size=4, backend="compile", progress=False)
    kinds = {key[0]: states.state(*key).backend for key in states.states if hasattr(states.state(*key), "backend")}
    assert kinds and set(kinds.values()) == {"compile"}, kinds  # the compiled update ran, not numba
    eager = evaluate(small_cnn, x, ts, measures, batch_size=4, backend="torch", progress=False)
    for name, result in eager.items():
        for layer in result.layer_names:
            np.testing.assert_allclose(compiled[name][layer], result[layer], rtol=1e-12, atol=1e-300,
                                       err_msg=f"{name} {layer}")
    constant = evaluate(Constant(), x[:6], ts, [NormalizedVariance()], backend="compile", progress=False)
    assert np.all(constant["NV[element,std]"]["Constant"] == 1.0)
    with pytest.raises(ValueError, match="backend must be 'auto', 'numba', 'torch' or 'compile'"):
        evaluate(small_cnn, x, ts, measures, backend="triton", progress=False)


class Constant(nn.Module):
    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.tensor(0.7))

    def forward(self, x):
        return torch.zeros(x.shape[0], 3, 2, 2) + self.bias


def test_constant_output_reads_nv_one():
    r = evaluate(Constant(), torch.randn(8, 1, 6, 6), T.rotations(4),
                 [NormalizedVariance(), NormalizedVariance(mode="channel"), TransformationVariance()], progress=False)
    assert np.all(r["NV[element,std]"]["Constant"] == 1.0)
    assert np.all(r["NV[channel,std]"]["Constant"] == 1.0)
    assert np.all(r["TV[element,std]"]["Constant"] == 0.0)


class Noise(nn.Module):
    """Ignores its input: fresh N(2, 3²) values for every image."""

    def __init__(self):
        super().__init__()
        self.gen = torch.Generator().manual_seed(0)

    def forward(self, x):
        return 2 + 3 * torch.randn(x.shape[0], 50, generator=self.gen)


def test_pure_noise_reads_tv_sv_three_and_nv_one():
    r = evaluate(Noise(), torch.randn(400, 1, 4, 4), T.rotations(25),
                 [TransformationVariance(), SampleVariance(), NormalizedVariance()], progress=False)
    layer = "Noise"
    assert r["TV[element,std]"].layer_means()[layer] == pytest.approx(3.0, rel=0.02)
    assert r["SV[element,std]"].layer_means()[layer] == pytest.approx(3.0, rel=0.02)
    assert r["NV[element,std]"].layer_means()[layer] == pytest.approx(1.0, rel=0.02)


class GlobalAverage(nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3))


def test_invariant_by_construction_reads_nv_zero():
    # The rotated images' pixels are the same set, summed in another order: float32 rounding
    # leaves NV at a few ulps (up to 1.1e-7 seen on unseeded inputs), not more.
    torch.manual_seed(0)
    r = evaluate(GlobalAverage(), torch.randn(10, 3, 8, 8), T.c4(), NormalizedVariance(), progress=False)
    values = r["NV[element,std]"]["GlobalAverage"]
    assert values.shape == (3,)
    assert np.all(np.abs(values) < 4 * np.finfo(np.float32).eps)


def test_division_convention_and_finite_layer_means():
    from tmlib.measures.variance import divide_nv

    out = divide_nv(np.array([0.0, 1.0, 2.0]), np.array([0.0, 0.0, 4.0]))
    assert out[0] == 1.0 and np.isinf(out[1]) and out[2] == 0.5
    res = MeasureResult("NV", {"a": out})
    assert res.layer_means()["a"] == pytest.approx(0.75)
    assert res.nonfinite_counts()["a"] == 1


def test_dataset_input_with_labels_and_fill(small_cnn):
    class DS(torch.utils.data.Dataset):
        fill = (-0.5,)
        name = "toy"

        def __init__(self):
            self.x = torch.randn(7, 1, 8, 8)

        def __len__(self):
            return 7

        def __getitem__(self, i):
            return self.x[i], i % 2

    ds = DS()
    a = evaluate(small_cnn, ds, T.rotations(4), NormalizedVariance(), batch_size=3, progress=False)
    b = evaluate(small_cnn, ds.x, T.rotations(4), NormalizedVariance(), fill=-0.5, progress=False)
    res = a["NV[element,std]"]
    assert res.metadata["dataset"] == "toy" and res.metadata["fill"] == [-0.5]
    for layer in res.layer_names:
        np.testing.assert_allclose(res[layer], b["NV[element,std]"][layer], rtol=1e-9)


def test_layer_selection_and_call_names():
    relu = nn.ReLU()
    model = nn.Sequential(nn.Conv2d(1, 2, 3), relu, nn.Conv2d(2, 2, 1), relu)
    r = evaluate(model, torch.randn(4, 1, 6, 6), T.c4(), TransformationVariance(), progress=False)
    assert r["TV[element,std]"].layer_names == ["0", "1", "2", "1#2"]
    r = evaluate(model, torch.randn(4, 1, 6, 6), T.c4(), TransformationVariance(), layers=["1#2", "0"], progress=False)
    assert r["TV[element,std]"].layer_names == ["0", "1#2"]


def test_in_place_activation_does_not_corrupt_earlier_layer():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True))
    x = torch.randn(30, 1, 2, 2)
    flat = nn.Sequential(nn.Flatten(), model)
    r = evaluate(flat, x, T.c4(), SampleVariance(), progress=False)["SV[element,std]"]
    pre = model[0](T.c4().apply(x).reshape(-1, 4)).detach().double().reshape(30, 4, 6)
    np.testing.assert_allclose(r["1.0"], pre.numpy().std(axis=0, ddof=1).mean(0), rtol=1e-6)
    assert not np.allclose(r["1.0"], r["1.1"])


def test_torchvision_resnet18_relu_called_twice():
    import torchvision

    model = torchvision.models.resnet18(num_classes=3).eval()
    names = []
    with activations.observe(model, lambda n, o: names.append(n)):
        model(torch.randn(1, 3, 32, 32))
    assert "layer1.0.relu" in names and "layer1.0.relu#2" in names
    assert names.index("layer1.0.relu") < names.index("layer1.0.bn2") < names.index("layer1.0.relu#2")
    r = evaluate(model, torch.randn(2, 3, 32, 32), T.c4(), NormalizedVariance(mode="channel"),
                 layers=["layer1.0.relu", "layer1.0.relu#2", "fc"], batch_size=1, progress=False)
    assert r["NV[channel,std]"]["layer1.0.relu#2"].shape == (64,)


def test_hooks_removed_even_after_exception(small_cnn):
    class Boom(Exception):
        pass

    def callback(name, out):
        raise Boom

    with pytest.raises(Boom):
        with activations.observe(small_cnn, callback):
            small_cnn(torch.randn(1, 1, 8, 8))
    assert all(len(m._forward_hooks) == 0 for m in small_cnn.modules())
    assert len(small_cnn._forward_pre_hooks) == 0


def test_bad_input_is_named(small_cnn):
    nv = NormalizedVariance()
    with pytest.raises(ValueError, match=r"x must be a tensor of shape \[n, C, H, W\]"):
        evaluate(small_cnn, torch.randn(4, 8, 8), T.c4(), nv, progress=False)
    with pytest.raises(ValueError, match="x: the dataset is empty"):
        evaluate(small_cnn, torch.utils.data.TensorDataset(torch.empty(0, 1, 8, 8)), T.c4(), nv, progress=False)
    with pytest.raises(ValueError, match="layers: unknown layer name 'conv9'"):
        evaluate(small_cnn, torch.randn(4, 1, 8, 8), T.c4(), nv, layers=["conv9"], progress=False)
    with pytest.raises(ValueError, match="ts: .*at least 2"):
        evaluate(small_cnn, torch.randn(4, 1, 8, 8), T.identity(), nv, progress=False)
    with pytest.raises(ValueError, match="device='meta': the meta device holds no data"):
        evaluate(small_cnn, torch.randn(4, 1, 8, 8), T.c4(), nv, device="meta", progress=False)
    if not torch.cuda.is_available():  # a tmlib error naming the argument, not torch's driver message
        with pytest.raises(ValueError, match="device='cuda': CUDA is not available on this machine"):
            evaluate(small_cnn, torch.randn(4, 1, 8, 8), T.c4(), nv, device="cuda", progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(small_cnn, torch.randn(4, 1, 8, 8), T.c4(), nv, batch_size=0, progress=False)
    with pytest.raises(TypeError, match="measures"):
        evaluate(small_cnn, torch.randn(4, 1, 8, 8), T.c4(), ["NV"], progress=False)
    with pytest.raises(ValueError, match="mode must be"):
        NormalizedVariance(mode="pixel")
    with pytest.raises(ValueError, match="at least 2 samples"):
        evaluate(small_cnn, torch.randn(1, 1, 8, 8), T.c4(), nv, progress=False)


def test_nan_activations_are_reported_with_the_layer_name():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Softplus(), nn.Flatten())
    with torch.no_grad():
        model[0].bias[1] = float("nan")
    with pytest.raises(NonFiniteActivationError, match="layer '0'"):
        evaluate(model, torch.randn(4, 1, 6, 6), T.c4(), NormalizedVariance(), progress=False)


def test_save_load_round_trip(tmp_path, small_cnn):
    r = evaluate(small_cnn, torch.randn(5, 1, 8, 8), T.c4(), NormalizedVariance(mode="channel"),
                 progress=False, metadata={"dataset": "toy"})["NV[channel,std]"]
    path = r.save(tmp_path / "nv.npz")
    back = MeasureResult.load(path)
    assert back.layer_names == r.layer_names and back.measure == r.measure
    for layer in r:
        np.testing.assert_array_equal(back[layer], r[layer])
    frame = back.to_frame()
    assert list(frame.columns) == ["layer", "index", "depth", "value", "measure", "model", "dataset", "transformation"]
    assert frame["dataset"].iloc[0] == "toy" and frame["depth"].iloc[-1] == 1.0
    assert frame["value"].tolist() == pytest.approx(r.layer_means().tolist())
    assert not list(tmp_path.glob(".*tmp"))


def test_aggregate_mode_collapses_each_feature_map(small_cnn):
    # The values against brute force (mean, sum, max): tests/test_harness.py.
    r = evaluate(small_cnn, torch.randn(9, 1, 8, 8), T.rotations(6), NormalizedVariance(mode="aggregate", agg="max"),
                 batch_size=4, progress=False)
    assert r["NV[aggregate,std,max]"]["0"].shape == (4,)
    assert r["NV[aggregate,std,max]"]["6"].shape == (5,)
    with pytest.raises(ValueError, match="agg must be"):
        NormalizedVariance(mode="aggregate", agg="median")
