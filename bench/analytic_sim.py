"""Accuracy cost of each DS speed option on the engine's analytic models, where the exact answer is known.

Models (``lib_delta.analytic.GaussianMixture``, 4 latent channels, 1x1 "images", float64): a target B in SD1's latent
space with two classes (the "prompt" is class 0), each class two Gaussian components, so the target has a
conditional denoiser ``D_c`` and an unconditional one ``D_u`` and samples with CFG, ``D_u + w (D_c - D_u)``, as the
webui does. The source base A is B seen in SDXL's latent space (the exact case of the README), the adapted A' is A
moved by an offset. Then the exact answer is known: DS at lambda = 1 samples exactly what the moved target B' samples
with the same CFG and the same noise, trajectory by trajectory (full DS reproduces it to ~1e-15).

Each option is mimicked exactly as ``lib_delta.webui.hooks`` applies it: lambda from ``LambdaSchedule.at_step(call,
total_calls)`` (window, decay; no leg call where lambda is 0), the delta recomputed at window calls 0, k, 2k, ... and
reused in between (``reuse_steps``), and ``cond_only`` = the source legs without their CFG (conditional denoisers
only, no uncond rows). Errors are reported against the exact answer, relative to the size of the adaptation:

* ``traj_err``: RMS over samples of |x_option - x_exact| / |offset| (0 = exact, ~1 = the adaptation lost);
* ``transfer``: the mean displacement from the no-DS samples, projected on the offset, as a fraction of the exact
  answer's (1 = all of the adaptation transferred);
* ``leg_calls`` / ``leg_rows``: source-leg denoiser calls / model rows as a fraction of full DS's (the analytic cost).

``batch_legs`` is exact by construction (the same rows in one forward instead of two) and has no row here.
Run: ``python -m bench.analytic_sim`` (seconds on a CPU).
"""

from __future__ import annotations

import torch

from lib_delta.analytic import GaussianMixture
from lib_delta.delta import source_delta
from lib_delta.latent import LatentMap, resolve_format
from lib_delta.samplers import karras_sigmas, sample_dpmpp_2m, sample_euler
from lib_delta.schedule import LambdaSchedule

TARGET, SOURCE = "sd1", "sdxl"
OFFSET = torch.tensor([0.8, -0.6, 0.4, 0.0], dtype=torch.float64)
CFG = 5.0
STEPS = 20
SAMPLES = 4096


def _class_mixtures() -> tuple[GaussianMixture, GaussianMixture]:
    """Target B: (conditional on class 0, unconditional over both classes)."""
    means = [[1.0, 0.5, 0.0, -0.5], [0.2, 1.4, 0.3, 0.0], [-1.2, -0.8, 0.5, 0.4], [-0.4, -1.6, -0.3, 0.2]]
    stds = [[0.35, 0.3, 0.4, 0.3], [0.3, 0.4, 0.35, 0.3], [0.4, 0.3, 0.3, 0.35], [0.3, 0.35, 0.3, 0.4]]
    cond = GaussianMixture.of([0.6, 0.4], means[:2], stds[:2])
    uncond = GaussianMixture.of([0.3, 0.2, 0.3, 0.2], means, stds)
    return cond, uncond


def _cfg(cond: GaussianMixture, uncond: GaussianMixture, scale: float):
    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        d_u = uncond.denoise(x, sigma)
        return d_u + scale * (cond.denoise(x, sigma) - d_u)

    return denoise


OPTIONS: list[tuple[str, dict]] = [
    ("full", {}),
    ("window [0, 0.5)", {"end": 0.5}),
    ("window [0.5, 1)", {"start": 0.5}),
    ("decay linear", {"decay": "linear"}),
    ("reuse_steps=2", {"reuse_steps": 2}),
    ("reuse_steps=3", {"reuse_steps": 3}),
    ("cond_only", {"cond_only": True}),
]


def simulate(sampler: str = "euler", steps: int = STEPS, samples: int = SAMPLES, seed: int = 0) -> dict:
    cond_b, uncond_b = _class_mixtures()
    latent_map = LatentMap.between(resolve_format(TARGET), resolve_format(SOURCE))
    r, c = latent_map.ratio, latent_map.offset
    cond_a, uncond_a = cond_b.affine(r, c), uncond_b.affine(r, c)
    cond_a2, uncond_a2 = cond_a.shifted(OFFSET * r), uncond_a.shifted(OFFSET * r)
    target = _cfg(cond_b, uncond_b, CFG)
    exact_model = _cfg(cond_b.shifted(OFFSET), uncond_b.shifted(OFFSET), CFG)

    sigmas = karras_sigmas(steps)
    gen = torch.Generator().manual_seed(seed)
    x_t = torch.randn(samples, 4, 1, 1, dtype=torch.float64, generator=gen) * sigmas[0]
    run = {"euler": sample_euler, "dpmpp_2m": sample_dpmpp_2m}[sampler]

    def ds_model(opts: dict) -> tuple:
        schedule = LambdaSchedule(1.0, opts.get("start", 0.0), opts.get("end", 1.0), opts.get("decay", "constant"))
        k = opts.get("reuse_steps", 1)
        if opts.get("cond_only"):
            base, adapted = cond_a.denoise, cond_a2.denoise
        else:
            base, adapted = _cfg(cond_a, uncond_a, CFG), _cfg(cond_a2, uncond_a2, CFG)

        def legs(x_s: torch.Tensor, sigma_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            counts["legs"] += 1
            counts["rows"] += 2 if opts.get("cond_only") else 4  # cond (+ uncond) rows of both legs
            return base(x_s, sigma_s), adapted(x_s, sigma_s)

        counts = {"call": 0, "window": 0, "legs": 0, "rows": 0}
        state: dict = {"last": None}

        def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            d_t = target(x, sigma)
            lam = schedule.at_step(counts["call"], steps)
            counts["call"] += 1
            if lam == 0:
                return d_t
            reuse = state["last"] is not None and counts["window"] % k != 0
            counts["window"] += 1
            if not reuse:
                state["last"] = source_delta(x, sigma, legs, latent_map)
            return d_t + lam * state["last"]

        return model, counts

    exact = run(exact_model, x_t, sigmas)
    no_ds = run(target, x_t, sigmas)
    norm = float(OFFSET.norm())
    unit = OFFSET / norm
    exact_moved = float((exact - no_ds).reshape(samples, -1).mean(0) @ unit)
    rows = []
    full_legs = full_rows = None
    for name, opts in OPTIONS:
        model, counts = ds_model(opts)
        x = run(model, x_t, sigmas)
        err = (x - exact).reshape(samples, -1)
        moved = (x - no_ds).reshape(samples, -1).mean(0)
        if name == "full":
            full_legs, full_rows = counts["legs"], counts["rows"]
        rows.append({
            "option": name,
            "traj_err": float(err.pow(2).sum(1).mean().sqrt()) / norm,
            "max_err": float(err.abs().max()),
            "transfer": float(moved @ unit) / exact_moved,
            "leg_calls": counts["legs"] / full_legs,
            "leg_rows": counts["rows"] / full_rows,
        })
    base_err = (no_ds - exact).reshape(samples, -1)
    return {
        "sampler": sampler, "steps": steps, "samples": samples, "cfg": CFG, "target": TARGET, "source": SOURCE,
        "offset_norm": norm,
        "no_ds_traj_err": float(base_err.pow(2).sum(1).mean().sqrt()) / norm,
        "options": rows,
    }


def run_all(quick: bool = False) -> list[dict]:
    samples = 1024 if quick else SAMPLES
    return [simulate(s, samples=samples) for s in ("euler", "dpmpp_2m")]


def main() -> None:
    for res in run_all():
        print(f"{res['sampler']}, {res['steps']} steps, CFG {res['cfg']}, {res['samples']} samples; "
              f"no DS: traj_err {res['no_ds_traj_err']:.3f}")
        for row in res["options"]:
            print(f"  {row['option']:<16} leg calls {row['leg_calls']:.2f} rows {row['leg_rows']:.2f}  "
                  f"traj_err {row['traj_err']:.2e}  transfer {row['transfer']:.3f}")


if __name__ == "__main__":
    main()
