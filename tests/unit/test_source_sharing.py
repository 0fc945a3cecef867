"""The host-independent pieces of the source-model cache: tensor sharing between two checkpoints' models.

``lib_delta.webui.source_models`` imports the webui's ``modules`` only inside its functions, so the pure-torch parts
are tested here without a webui; loading itself is tested in the real webui (tests/webui).
"""

import torch
from torch import nn

from lib_delta.webui.source_models import share_identical_tensors


def two_models():
    torch.manual_seed(0)
    keep = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    other = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    other[0].load_state_dict(keep[0].state_dict())  # identical first layer, different second
    return keep, other


def test_identical_parameters_become_one_tensor_and_outputs_do_not_change():
    keep, other = two_models()
    x = torch.randn(3, 8)
    before = other(x)
    saved = share_identical_tensors(keep, other)
    assert saved == (8 * 8 + 8) * 4
    assert other[0].weight is keep[0].weight and other[0].bias is keep[0].bias
    assert other[1].weight is not keep[1].weight
    assert torch.equal(other(x), before)


def test_nothing_shared_when_dtypes_or_values_differ():
    keep, other = two_models()
    other.double()
    assert share_identical_tensors(keep, other) == 0
    keep2, other2 = two_models()
    with torch.no_grad():
        other2[0].weight[0, 0] += 1e-6
    assert share_identical_tensors(keep2, other2) == 8 * 4  # only the bias of the first layer is still identical
