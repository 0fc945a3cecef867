"""Delta Sampling (DS): carry an adaptation made for one base model over to another model at inference.

At every denoiser call DS adds lambda times the source pair's x0 difference, mapped into the target's latent space, to
the target's own x0 prediction. This package is the host-free engine: maths on tensors only, no webui imports.
"""

from .delta import Denoiser, PairDenoiser, check_finite, delta_denoised, delta_eps, pair_of, source_delta
from .errors import DeltaSamplingError, ParamError
from .latent import LATENT_FORMATS, LatentFormat, LatentMap, resolve_format
from .params import SETTINGS, DeltaParams, LoraSpec, Setting
from .schedule import DECAY_SHAPES, LambdaSchedule, guard_delta
from .timesteps import DiscreteSchedule, vp_to_ve, x0_delta_to_eps

__version__ = "0.1.0"

__all__ = [
    "DECAY_SHAPES",
    "LATENT_FORMATS",
    "SETTINGS",
    "DeltaParams",
    "DeltaSamplingError",
    "Denoiser",
    "DiscreteSchedule",
    "LambdaSchedule",
    "LatentFormat",
    "LatentMap",
    "LoraSpec",
    "PairDenoiser",
    "ParamError",
    "Setting",
    "__version__",
    "check_finite",
    "delta_denoised",
    "delta_eps",
    "guard_delta",
    "pair_of",
    "resolve_format",
    "source_delta",
    "vp_to_ve",
    "x0_delta_to_eps",
]
