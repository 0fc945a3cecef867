"""The embedded demo: Delta Sampling on analytic "models" whose exact denoisers are known.

Source base A and target B are different Gaussian mixtures living in different latent formats (A in SDXL's scaled
latent space, B in SD1's). The adaptation A -> A' moves A's data by a fixed offset. DS samples the target with
``D_B + lambda * (D_A' - D_A)`` and the demo reports how much of the offset arrived in the target's samples, and checks
the exact case (A the image of B under the latent map) to float precision.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .analytic import GaussianMixture
from .delta import delta_denoised
from .latent import LatentMap
from .samplers import karras_sigmas, sample_euler

TARGET, SOURCE = "sd1", "sdxl"
LAMBDAS = (0.0, 0.5, 1.0, 1.5)
SHIFT_TARGET = torch.tensor([1.2, 0.9, 0.0, 0.0], dtype=torch.float64)  # the adaptation, in target-space units
SHAPE = (4, 1, 1)  # one "latent pixel" of 4 channels; the figure shows channels 0 and 1


def build_models() -> dict[str, GaussianMixture]:
    latent_map = LatentMap.between(TARGET, SOURCE)
    r, c = latent_map.ratio, latent_map.offset
    target = GaussianMixture.of(
        [1.0, 1.0, 1.0],
        [[-1.6, -0.8, 0.0, 0.0], [1.6, -0.8, 0.0, 0.0], [0.0, 1.6, 0.0, 0.0]],
        [0.35, 0.35, 0.35],
    )
    source = GaussianMixture.of(
        [2.0, 1.0],
        [[-0.7 * r, 0.0, 0.0, 0.0], [0.9 * r, 0.6 * r, 0.0, 0.0]],
        [0.45 * r, 0.3 * r],
    )
    return {
        "target": target,
        "source": source,
        "adapted": source.shifted(SHIFT_TARGET * r),
        "ideal": target.shifted(SHIFT_TARGET),
        # The exact case: the source pair is the target's own distribution seen through the latent map.
        "exact_source": target.affine(r, c),
        "exact_adapted": target.affine(r, c).shifted(SHIFT_TARGET * r),
    }


def exactness_error(models: dict[str, GaussianMixture], seed: int = 0) -> float:
    """Max |DS(lambda=1) - exact denoiser of the shifted target| over random x and sigmas (the exact case)."""
    g = torch.Generator().manual_seed(seed)
    sigma = torch.logspace(-2, 2, 64, dtype=torch.float64)
    x = models["ideal"].sample(64, g).reshape(64, *SHAPE) + sigma.view(-1, 1, 1, 1) * torch.randn(
        64, *SHAPE, dtype=torch.float64, generator=g
    )
    got = delta_denoised(
        x, sigma, models["target"].denoise(x, sigma), models["exact_source"].denoise, models["exact_adapted"].denoise,
        scale=1.0, source=SOURCE, target=TARGET,
    )
    return float((got - models["ideal"].denoise(x, sigma)).abs().max())


def sample_ds(
    models: dict[str, GaussianMixture], scale: float, noise: torch.Tensor, steps: int, prefix: str = ""
) -> torch.Tensor:
    """Euler samples of the target with DS using the source pair ``{prefix}source`` -> ``{prefix}adapted``."""
    base, adapted = models[prefix + "source"], models[prefix + "adapted"]

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return delta_denoised(
            x, sigma, models["target"].denoise(x, sigma), base.denoise, adapted.denoise,
            scale=scale, source=SOURCE, target=TARGET,
        )

    sigmas = karras_sigmas(steps)
    return sample_euler(model, noise * sigmas[0], sigmas).reshape(noise.shape[0], -1)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 64, seed: int = 0) -> float:
    """Mean 1-D Wasserstein-1 distance over random directions between two equally sized point clouds."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], projections, dtype=torch.float64, generator=g)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, pb = (a.to(torch.float64) @ dirs).sort(0).values, (b.to(torch.float64) @ dirs).sort(0).values
    return float((pa - pb).abs().mean())


def run_demo(out: str = "delta_sampling_demo.png", samples: int = 3000, steps: int = 30, seed: int = 0) -> dict:
    """Sample, print a summary, write the figure to ``out``; returns the numbers printed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    started = time.perf_counter()
    models = build_models()
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(samples, *SHAPE, dtype=torch.float64, generator=g)
    clouds = {scale: sample_ds(models, scale, noise, steps) for scale in LAMBDAS}
    exact_clouds = {scale: sample_ds(models, scale, noise, steps, prefix="exact_") for scale in LAMBDAS}
    ideal_cloud = sample_euler(models["ideal"].denoise, noise * karras_sigmas(steps)[0], karras_sigmas(steps))
    ideal_cloud = ideal_cloud.reshape(samples, -1)
    base_mean = clouds[0.0].mean(0)
    wanted = SHIFT_TARGET
    summary = {"exact_case_max_error": exactness_error(models, seed), "transfer": {}, "distance_to_ideal": {},
               "exact_distance_to_ideal": {}}
    print("Delta Sampling demo: target B in SD1 latent space, source pair A -> A' in SDXL latent space")
    print(f"  latent map target->source: {LatentMap.between(TARGET, SOURCE)}")
    print(f"  adaptation (offset in target units): {wanted[:2].tolist()}")
    print(f"  exact case (A = image of B): max |DS(lambda=1) - exact| = {summary['exact_case_max_error']:.2e}")
    for scale, cloud in clouds.items():
        moved = cloud.mean(0) - base_mean
        transfer = float(moved @ wanted / (wanted @ wanted))
        summary["transfer"][scale] = transfer
        summary["distance_to_ideal"][scale] = sliced_wasserstein(cloud, ideal_cloud)
        summary["exact_distance_to_ideal"][scale] = sliced_wasserstein(exact_clouds[scale], ideal_cloud)
        print(f"  lambda={scale:<4g} mean moved by {[round(v, 3) for v in moved[:2].tolist()]}"
              f" -> {100 * transfer:5.1f}% of the adaptation transferred;"
              f" distance to ideal {summary['distance_to_ideal'][scale]:.3f}"
              f" (matched source pair: {summary['exact_distance_to_ideal'][scale]:.3f})")

    fig, axes = plt.subplots(3, 4, figsize=(16, 12), sharex=True, sharey=True)
    gen = torch.Generator().manual_seed(seed + 1)
    r = LatentMap.between(TARGET, SOURCE).ratio
    panels = [
        ("source base A (shown in target units)", models["source"].sample(samples, gen) / r, "tab:blue"),
        ("source adapted A' (target units)", models["adapted"].sample(samples, gen) / r, "tab:orange"),
        ("target B", models["target"].sample(samples, gen), "tab:green"),
        ("ideal: B moved by the adaptation", models["ideal"].sample(samples, gen), "tab:gray"),
    ]
    panels += [(f"DS, source pair A -> A', lambda = {s:g}", clouds[s], "tab:red") for s in LAMBDAS]
    panels += [(f"DS, matched pair (A = B mapped), lambda = {s:g}", exact_clouds[s], "tab:purple") for s in LAMBDAS]
    for ax, (title, pts, color) in zip(axes.flat, panels, strict=True):
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.35, color=color)
        ax.set_title(title, fontsize=10)
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
    fig.suptitle(f"Delta Sampling on analytic models: D_B + lambda * (D_A' - D_A), Euler, {steps} steps")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    print(f"  wrote {out} in {time.perf_counter() - started:.1f} s")
    return summary
