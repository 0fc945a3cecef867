"""Test-only (tests/forge/test_forge_precision.py, mode "fp16 compute"): reproduce a GPU's fp16 computation in Forge
on this CPU-only machine.

Forge computes in float32 on a CPU whatever it stores (``memory_management.get_computation_dtype`` answers float32
for a CPU device), and where storage and computation differ its layers cast weights to the input's dtype, which
hides dtype mistakes. On a GPU with fp16 storage both are fp16 and nothing casts: a float32 tensor meeting an fp16
layer fails there. Forge loads models lazily (on the first generation), so answering fp16 from here, at script load,
is in time for every model it builds, the source engines and ControlNets included.
"""

import torch
from backend import memory_management


def _fp16_computation(*args, **kwargs):
    return torch.float16


memory_management.get_computation_dtype = _fp16_computation
print("forge_fp16_compute (test support): Forge computes in float16 on the CPU")
