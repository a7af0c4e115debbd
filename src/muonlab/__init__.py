"""muonlab: the Muon optimizer family for PyTorch, and a lab that compares it.

Public API (everything importable from ``muonlab``):

* :func:`orthogonalize` - msign(G) = U Vᵀ by SVD, Newton-Schulz (presets or custom
  coefficients), Gram Newton-Schulz or the coupled inverse-square-root iteration.
* :data:`PRESETS`, :func:`resolve_schedule`, :func:`fit_coefficients` - coefficient schedules.
"""

from .coefficients import PRESETS, FitResult, fit_coefficients, resolve_schedule, scalar_map
from .orthogonalize import METHODS, normalize_frobenius, orthogonalize

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "PRESETS",
    "FitResult",
    "fit_coefficients",
    "normalize_frobenius",
    "orthogonalize",
    "resolve_schedule",
    "scalar_map",
    "__version__",
]
