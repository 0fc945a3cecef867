"""`python -m lib_delta demo [--out PATH]`: Delta Sampling end to end on analytic models (no webui, GPU, downloads)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib_delta", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run Delta Sampling on 2-D Gaussian-mixture models and write a PNG figure")
    demo.add_argument("--out", default="delta_sampling_demo.png", help="where to write the figure (PNG)")
    demo.add_argument("--samples", type=int, default=3000, help="points per cloud")
    demo.add_argument("--steps", type=int, default=30, help="sampler steps (Euler, Karras schedule)")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(out=args.out, samples=args.samples, steps=args.steps, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
