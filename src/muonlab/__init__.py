"""muonlab: the Muon optimizer family for PyTorch, and a lab that compares it.

Public API (everything importable from ``muonlab``):

* :func:`orthogonalize` - msign(G) = U Vᵀ by SVD, Newton-Schulz (presets or custom
  coefficients), Gram Newton-Schulz or the coupled inverse-square-root iteration.
* :class:`Muon` - the optimizer: Muon for hidden matrices, AdamW for the rest, one object.
* :func:`muon_param_groups` - module-aware routing, with a readable report.
* :data:`PRESETS`, :func:`resolve_schedule`, :func:`fit_coefficients` - coefficient schedules.
* :class:`QKClip`, :class:`QKSpec`, :class:`HeadRows`, :func:`qk_clip_factors` - QK-Clip (Kimi K2's
  MuonClip): per-head rescaling of query/key weights when attention logits exceed a threshold.
"""

from .coefficients import PRESETS, FitResult, fit_coefficients, resolve_schedule, scalar_map
from .orthogonalize import METHODS, normalize_frobenius, orthogonalize
from .optimizer import Muon, NonFiniteGradientError
from .qkclip import HeadRows, QKClip, QKClipStats, QKSpec, qk_clip_factors
from .routing import RoutingReport, muon_param_groups
from .updates import adjust_lr_scale

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "Muon",
    "NonFiniteGradientError",
    "HeadRows",
    "QKClip",
    "QKClipStats",
    "QKSpec",
    "qk_clip_factors",
    "RoutingReport",
    "adjust_lr_scale",
    "muon_param_groups",
    "PRESETS",
    "FitResult",
    "fit_coefficients",
    "normalize_frobenius",
    "orthogonalize",
    "resolve_schedule",
    "scalar_map",
    "__version__",
]
