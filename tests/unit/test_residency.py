"""The low-VRAM policy (lib_delta.residency): one model on the compute device at a time, the host's resident module
sent out first, the source model back on the offload device after its block (after an error too), bytes counted."""

from __future__ import annotations

import pytest
import torch

from lib_delta.residency import Offloader

GPU, CPU = torch.device("cuda"), torch.device("cpu")  # names only: nothing is allocated on them


class Model:
    """A model as the policy sees it: where it is, and its size."""

    def __init__(self, name: str, size: int, where: dict[str, torch.device], device: torch.device = CPU) -> None:
        self.name, self.size, self.where = name, size, where
        where[name] = device

    def move(self, device: torch.device) -> None:
        self.where[self.name] = device

    def nbytes(self) -> int:
        return self.size


def test_a_visit_sends_the_host_out_first_and_the_source_back_after():
    where: dict[str, torch.device] = {}
    target = Model("target unet", 1000, where, GPU)  # --medvram: it stays in VRAM after its forward
    base, adapted = Model("base", 300, where), Model("adapted", 300, where)
    offloader = Offloader(send_host_out=lambda: target.move(CPU))
    seen = []
    for source in (base, adapted):  # a checkpoint pair: one visit per leg
        with offloader.visit(source, GPU, CPU):
            seen.append(dict(where))
        assert where[source.name] == CPU
    assert seen == [{"target unet": CPU, "base": GPU, "adapted": CPU},
                    {"target unet": CPU, "base": CPU, "adapted": GPU}]
    assert offloader.take_counts() == {"offload_visits": 2, "moved_bytes": 4 * 300}
    assert offloader.take_counts() == {"offload_visits": 0, "moved_bytes": 0}


def test_a_failing_leg_still_goes_back():
    where: dict[str, torch.device] = {}
    source = Model("source", 10, where)
    offloader = Offloader()
    with pytest.raises(torch.cuda.OutOfMemoryError), offloader.visit(source, GPU, CPU):
        assert where["source"] == GPU
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
    assert where["source"] == CPU
    assert offloader.take_counts()["moved_bytes"] == 20
