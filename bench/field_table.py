"""Accuracy of the native-resolution legs on the exactly solvable spatial model: ``python -m bench.field_table``.

Stationary Gaussian fields on a 64 x 64 latent grid (``lib_delta.analytic_field``; an image-like spectrum), target =
source base = A, adapted = A with a change that lives in one frequency band (or in the mean). DS at lambda 1 with legs
that are the exact denoisers of the k-pooled fields is compared with the exact adapted denoiser at full resolution,
over noisy samples of the adapted field. Prints markdown (and writes it with ``--markdown PATH``); seconds on a CPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

import torch  # noqa: E402

from lib_delta.analytic_field import DT, StationaryField, band, natural_spectrum, transfer_error  # noqa: E402

GRID = 64
SIGMAS = (0.5, 2.0, 8.0)
# (label, band in cycles per latent cell); the coarse grid's Nyquist is 0.5 / k cycles per cell (0.25 for k = 2)
ADAPTATIONS = (
    ("mean (all channels shifted)", None),
    ("band 0 - 0.0625 (low)", (0.0, 0.0625)),
    ("band 0.0625 - 0.125", (0.0625, 0.125)),
    ("band 0.125 - 0.25 (up to k=2 Nyquist)", (0.125, 0.25)),
    ("band 0.25 - 0.5 (above it)", (0.25, 0.5)),
    ("band 0.5 - 0.71 (corners)", (0.5, 0.75)),
)
CONFIGS = (("k=2 bilinear", 2, "bilinear"), ("k=2 nearest", 2, "nearest"), ("k=4 bilinear", 4, "bilinear"))


def fields(spec: tuple[float, float] | None) -> tuple[StationaryField, StationaryField]:
    psd = natural_spectrum(GRID)
    base = StationaryField(torch.zeros(4, dtype=DT), psd)
    if spec is None:
        return base, StationaryField(torch.tensor([0.5, -0.3, 0.2, 0.1], dtype=DT), psd)
    return base, StationaryField(base.mean.clone(), psd + 2.0 * band(GRID, *spec))


def table() -> str:
    head = "| adaptation | " + " | ".join(f"{name}, sigma {s:g}" for name, _, _ in CONFIGS for s in SIGMAS) + " |"
    lines = [head, "|" + " --- |" * (1 + len(CONFIGS) * len(SIGMAS))]
    for label, spec in ADAPTATIONS:
        base, adapted = fields(spec)
        cells = []
        for _, factor, mode in CONFIGS:
            for sigma in SIGMAS:
                error, share = transfer_error(base, adapted, sigma, factor, upsample=mode, count=8)
                cells.append(f"{100 * share:.0f}% / {100 * error:.0f}%")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", type=Path, help="write the table there as well")
    args = parser.parse_args(argv)
    text = table()
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
