"""Every exported measure class through the same checks (tests/harness.py):

brute force over the full stored ST tensor; batch sizes {1, k, n}; split-and-merge equals one pass;
delete-one-block jackknife equals recomputing on the samples minus each block; numba vs torch
backends; CUDA vs CPU (skipped, saying so, without a GPU); a measure object reused gives equal
results; and a test that fails on any exported class the harness does not cover.
"""

import functools
import inspect
import warnings

import numpy as np
import pytest
import torch
from harness import FAMILIES, N, covered_classes, families_of, recorded, samples, set_key, small_cnn

import tmlib.measures
from tmlib.engine import block_bounds, collect_references
from tmlib.measures import Measure, collect, evaluate, merge_states
from tmlib.measures.moments import numba_available

EXPORTED = sorted(
    (obj for name, obj in vars(tmlib.measures).items()
     if name in tmlib.measures.__all__ and inspect.isclass(obj) and issubclass(obj, Measure)
     and not inspect.isabstract(obj)),
    key=lambda cls: cls.__name__,
)
BACKENDS = ["torch"] + (["numba"] if numba_available() else [])


def _evaluate(family, ts, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # G-EED's fallback warning, tested in test_geed
        return evaluate(small_cnn(), kwargs.pop("x", samples()), ts, family.measures(), progress=False, **kwargs)


@functools.cache
def _run(family_name: str, set_index: int, drop_block: int | None = None, blocks: int | None = None, **kwargs):
    """A family's results on one of its sets, cached: every class of the family reads the same
    pass. ``drop_block``: the samples without block ``drop_block`` of ``blocks``."""
    family = next(f for f in FAMILIES if f.name == family_name)
    x = samples()
    if drop_block is not None:
        bounds = block_bounds(N, blocks)
        keep = torch.ones(N, dtype=torch.bool)
        keep[bounds[drop_block] : bounds[drop_block + 1]] = False
        x, blocks = x[keep], None
    return _evaluate(family, family.sets[set_index](), x=x, blocks=blocks, **kwargs)


def _close(a, b, rtol, atol, what):
    np.testing.assert_allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float), rtol=rtol, atol=atol,
                               equal_nan=True, err_msg=what)


def _cases(cls):
    """(family, index of the set, the set) for every family of ``cls`` and each of its sets."""
    return [(family, i, make()) for family in families_of(cls) for i, make in enumerate(family.sets)]


def test_every_exported_measure_class_is_covered():
    missing = [cls.__name__ for cls in EXPORTED if cls not in covered_classes()]
    assert not missing, f"tests/harness.py has no case for {missing}"
    assert len(EXPORTED) == 15


@pytest.mark.parametrize("cls", EXPORTED, ids=lambda c: c.__name__)
def test_brute_force_on_the_full_st_tensor(cls):
    for family, i, ts in _cases(cls):
        results = _run(family.name, i, batch_size=3)
        st, ref = recorded(set_key(ts))
        for measure in family.instances[cls]:
            result = results[measure.name]
            for layer, values in st.items():
                expected = family.brute[cls](measure, values, ref[layer], ts)
                if expected is None:  # the measure skips this layer, and says so
                    assert layer not in result.layer_names and layer in result.metadata["skipped_layers"]
                    continue
                got = result[layer]
                assert got.shape == np.shape(expected), f"{measure.name} {layer}"
                _close(got, expected, family.rtol, family.atol, f"{measure.name} {layer} {ts.name}")


@pytest.mark.parametrize("cls", EXPORTED, ids=lambda c: c.__name__)
def test_batch_size_does_not_matter(cls):
    for family, i, _ in _cases(cls):
        runs = [_run(family.name, i, batch_size=bs) for bs in (1, 4, N)]
        for measure in family.instances[cls]:
            for layer in runs[0][measure.name].layer_names:
                for other in runs[1:]:
                    _close(other[measure.name][layer], runs[0][measure.name][layer],
                           family.tolerance("batch_rtol", measure), 0,
                           f"{measure.name} {layer}")


@functools.cache
def _merged_halves(family_name: str, set_index: int, shared: bool = True):
    """States of samples 0…3 and 4…9 collected separately, merged, computed (or the merge's error).
    Measures with a reference pass share one over both halves (``collect_references``) unless
    ``shared`` is False."""
    family = next(f for f in FAMILIES if f.name == family_name)
    model, x, ts, measures = small_cnn(), samples(), family.sets[set_index](), family.measures()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        references = None
        if shared and any(m.spec().reference_spec() is not None for m in measures):
            references = merge_states(*[collect_references(model, part, ts, measures, n_total=N, start=start,
                                                           progress=False) for start, part in ((0, x[:4]), (4, x[4:]))])
        first = collect(model, x[:4], ts, measures, batch_size=3, progress=False, references=references)
        second = collect(model, x[4:], ts, measures, batch_size=3, progress=False, references=references, start=4)
        try:
            return merge_states(first, second).compute(measures)
        except ValueError as error:
            return error


@pytest.mark.parametrize("cls", EXPORTED, ids=lambda c: c.__name__)
def test_states_of_two_halves_merge_into_one_pass(cls):
    for family, i, _ in _cases(cls):
        merged = _merged_halves(family.name, i)
        whole = _run(family.name, i, batch_size=3)
        for measure in family.instances[cls]:
            assert merged[measure.name].metadata["n"] == N
            for layer in whole[measure.name].layer_names:
                _close(merged[measure.name][layer], whole[measure.name][layer],
                       family.tolerance("merge_rtol", measure), 1e-13, f"{measure.name} {layer}")
        if not family.mergeable:  # Goodfellow: two reference passes, two sets of thresholds
            apart = _merged_halves(family.name, i, shared=False)
            assert isinstance(apart, ValueError) and "do not merge" in str(apart)


@pytest.mark.parametrize("cls", EXPORTED, ids=lambda c: c.__name__)
def test_jackknife_replicates_equal_recomputing_without_each_block(cls):
    k = 3
    for family, i, ts in _cases(cls):
        if not cls.supports_blocks:
            with pytest.raises(ValueError, match="blocks: .*thresholds are set on all n samples"):
                _evaluate(family, ts, blocks=k)
            continue
        blocked = _run(family.name, i, blocks=k, batch_size=3)
        plain = _run(family.name, i, batch_size=3)
        for measure in family.instances[cls]:  # the values themselves do not move (merge of all blocks)
            assert blocked[measure.name].metadata["block_sizes"] == [3, 3, 4]
            for layer in plain[measure.name].layer_names:
                _close(blocked[measure.name][layer], plain[measure.name][layer], 1e-12, 0, f"{measure.name} {layer}")
        for b in range(k):
            alone = _run(family.name, i, drop_block=b, blocks=k, batch_size=3)
            for measure in family.instances[cls]:
                expected = alone[measure.name].layer_means()
                got = blocked[measure.name].replicates.iloc[b][list(expected.index)]
                _close(got, expected, 1e-9, 1e-13, f"{measure.name} replicate {b}")


@pytest.mark.parametrize("cls", EXPORTED, ids=lambda c: c.__name__)
def test_numba_and_torch_backends_agree(cls):
    if not numba_available():
        pytest.skip("numba is not installed: only the torch backend exists")
    for family, i, _ in _cases(cls):
        a, b = (_run(family.name, i, batch_size=3, backend=backend) for backend in ("numba", "torch"))
        for measure in family.instances[cls]:
            for layer in a[measure.name].layer_names:
                _close(a[measure.name][layer], b[measure.name][layer], 1e-10, 1e-14, f"{measure.name} {layer}")


@pytest.mark.parametrize("cls", EXPORTED, ids=lambda c: c.__name__)
def test_a_measure_object_reused_gives_equal_results(cls):
    family, _, ts = _cases(cls)[0]
    own = family.instances[cls]
    runs = [evaluate(small_cnn(), samples(), ts, own, progress=False) for _ in range(3)]
    first, second, again = runs  # the same instances, three times: nothing accumulated on them
    for measure in own:
        for layer in first[measure.name].layer_names:
            np.testing.assert_array_equal(first[measure.name][layer], second[measure.name][layer])
            np.testing.assert_array_equal(first[measure.name][layer], again[measure.name][layer])
        assert vars(measure) == vars(type(measure)(**_options(measure)))  # options only


def _options(measure):
    """The constructor arguments of ``measure``, read back from its attributes."""
    params = inspect.signature(type(measure).__init__).parameters
    return {name: getattr(measure, name) for name in params if name != "self" and hasattr(measure, name)}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine: CUDA vs CPU not checked")
@pytest.mark.parametrize("cls", EXPORTED, ids=lambda c: c.__name__)
def test_cuda_agrees_with_cpu(cls):  # pragma: no cover - needs a GPU
    for family, _, ts in _cases(cls):
        cpu = _evaluate(family, ts, batch_size=3, backend="torch")
        cuda = _evaluate(family, ts, batch_size=3, device="cuda")
        for measure in family.instances[cls]:
            assert cuda[measure.name].metadata["device"].startswith("cuda")
            for layer in cpu[measure.name].layer_names:
                _close(cuda[measure.name][layer], cpu[measure.name][layer], max(family.rtol, 1e-5), 1e-6,
                       f"{measure.name} {layer}")


def test_families_are_the_harness_cases():
    assert {f.name for f in FAMILIES} >= {"variance", "anova", "goodfellow", "distance", "same-equivariance", "geed"}
