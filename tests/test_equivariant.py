"""tmlib.equivariant.SteerableCNN's readouts: exactly invariant head and equivariant fields."""

import pytest
import torch

from tmlib import transforms as T
from tmlib.equivariant import SteerableCNN
from tmlib.measures import GEEDEquivariance, GEEDInvariance, evaluate


@pytest.mark.parametrize("group,ts", [("C4", T.c4()), ("D4", T.d4())])
@pytest.mark.parametrize("size", [16, 28])  # maps of 4×4 (even kernel) and 7×7 after the poolings
def test_full_readout_is_invariant_and_equivariant_by_construction(group, ts, size):
    torch.manual_seed(0)
    model = SteerableCNN(group=group, fields=(2, 2, 3), fc_units=8, image_size=size, readout="full").eval()
    x = torch.randn(4, 1, size, size, generator=torch.Generator().manual_seed(1))
    res = evaluate(model, x, ts, [GEEDInvariance(), GEEDEquivariance(action=model.latent_actions(ts))], progress=False)
    invariance, own = res["GEED-inv[cosine,False]"], res["GEED-eq[cosine,custom]"]
    assert model.config["readout"] == "full" and model.layer_names() == SteerableCNN(image_size=size).layer_names()
    assert tuple(model.conv2(torch.zeros(1, model.conv1.out_type.size, size // 4, size // 4)).shape[-2:]) == (1, 1)
    for layer in model.invariant_layers() + ["gpool"]:
        assert float(invariance[layer]) < 1e-5, layer
    for layer in model.equivariant_layers():
        assert float(own[layer]) < 1e-5, layer
    assert float(invariance["act1"]) > 1e-3  # the maps before the readout still move


def test_readout_is_checked_and_keyed():
    with pytest.raises(ValueError, match="readout"):
        SteerableCNN(readout="mean")
    assert SteerableCNN(image_size=8).config["readout"] == "pool"  # part of the checkpoint key
