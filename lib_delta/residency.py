"""The low-VRAM policy for source models (the webui's ``--lowvram``/``--medvram``): one model on the GPU at a time.

The webui's own low-VRAM code (``modules/lowvram.py``) keeps one of its modules on the GPU at a time and moves it out
when another one's forward begins, but after a target forward under ``--medvram`` the target's UNet stays in VRAM
until the VAE or the text encoder needs the GPU. A source leg that just moved its model in would sit beside it: the
peak would be two UNets, on the cards these flags are for. So each visit first sends the host's resident module out
(as sd-webui-controlnet does under ``--lowvram``); the target's forward pre-hook brings it back for the next target
call. Bytes moved are counted (both directions), for the status route and the bench.

Host-free: the host hands in what "send your own models out" means; models only need ``move(device)`` and
``nbytes()``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch


class Movable(Protocol):
    def move(self, device: torch.device) -> None: ...

    def nbytes(self) -> int: ...


class Offloader:
    """Brings a model to the compute device for one block and back after it, the host's module sent out first."""

    def __init__(self, send_host_out: Callable[[], None] | None = None) -> None:
        self.send_host_out = send_host_out
        self.moved_bytes = 0  # since the last take_counts()
        self.visits = 0

    @contextlib.contextmanager
    def visit(self, model: Movable, device: torch.device, offload_device: torch.device) -> Iterator[None]:
        if self.send_host_out is not None:
            self.send_host_out()
        size = model.nbytes()
        self.visits += 1
        try:
            model.move(device)
            self.moved_bytes += size
            yield
        finally:
            model.move(offload_device)  # also after an error (an out-of-memory one above all)
            self.moved_bytes += size

    def take_counts(self) -> dict[str, Any]:
        """The counts since the last call, then zero."""
        counts = {"offload_visits": self.visits, "moved_bytes": self.moved_bytes}
        self.visits = self.moved_bytes = 0
        return counts
