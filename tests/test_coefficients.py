"""Layer 1: coefficient presets, ``resolve_schedule``, ``scalar_map`` and the fitter."""

from __future__ import annotations

import math

import pytest
import torch

from muonlab import PRESETS, FitResult, fit_coefficients, resolve_schedule, scalar_map
from muonlab.coefficients import CUBIC, KELLER, POLAR_EXPRESS, TAYLOR, YOU, _POLAR_EXPRESS_RAW



# --------------------------------------------------------------------------------------------
# the published constants
# --------------------------------------------------------------------------------------------


def test_preset_names() -> None:
    assert set(PRESETS) == {"keller", "taylor", "cubic", "you", "polar_express"}
    for name, preset in PRESETS.items():
        assert preset.name == name
        assert preset.source.strip()
        assert len(preset.schedule) >= 1
        assert all(len(t) == 3 and all(isinstance(v, float) for v in t) for t in preset.schedule)


def test_keller_constants() -> None:
    assert KELLER == (3.4445, -4.7750, 2.0315)
    assert PRESETS["keller"].schedule == ((3.4445, -4.7750, 2.0315),)


def test_taylor_constants_are_the_taylor_expansion_of_inverse_sqrt() -> None:
    assert TAYLOR == (15 / 8, -5 / 4, 3 / 8)
    a, b, c = TAYLOR
    # p(t) = a + b t + c t² matches f(t) = t^(-1/2) to second order at t = 1
    assert math.isclose(a + b + c, 1.0)  # f(1) = 1
    assert math.isclose(b + 2 * c, -0.5)  # f'(1) = -1/2
    assert math.isclose(2 * c, 0.75)  # f''(1) = 3/4


def test_cubic_constants() -> None:
    assert CUBIC == (1.5, -0.5, 0.0)
    assert math.isclose(sum(CUBIC), 1.0)


def test_you_constants() -> None:
    assert len(YOU) == 6
    assert PRESETS["you"].schedule == YOU
    assert PRESETS["you"].default_steps == 6
    # published in units of 1/1024
    for triple in YOU:
        for v in triple:
            assert float(v * 1024).is_integer()
    assert YOU[0] == (3955 / 1024, -8306 / 1024, 5008 / 1024)
    assert YOU[-1] == (2172 / 1024, -1833 / 1024, 682 / 1024)


def test_polar_express_constants() -> None:
    assert len(POLAR_EXPRESS) == 8
    assert PRESETS["polar_express"].schedule == POLAR_EXPRESS
    assert _POLAR_EXPRESS_RAW[0] == (8.28721201814563, -23.595886519098837, 17.300387312530933)
    # safety factor 1.01 on every step but the last: (a/1.01, b/1.01³, c/1.01⁵)
    a, b, c = POLAR_EXPRESS[0]
    assert math.isclose(a, 8.28721201814563 / 1.01, rel_tol=1e-15)
    assert math.isclose(b, -23.595886519098837 / 1.01**3, rel_tol=1e-15)
    assert math.isclose(c, 17.300387312530933 / 1.01**5, rel_tol=1e-15)
    # the last entry is the Taylor step, unscaled
    assert POLAR_EXPRESS[-1] == (1.875, -1.25, 0.375) == TAYLOR


def test_every_preset_has_a_fixed_point_near_one() -> None:
    # g(x) = x has a root in [0.99, 1.0] for the last step of every schedule (it is what the
    # iteration converges to when repeated); Taylor, cubic and Polar Express end exactly at 1,
    # You's last step at ~0.996, Keller's quintic does not converge but oscillates around ~0.87.
    for name in ("taylor", "cubic", "polar_express"):
        a, b, c = PRESETS[name].schedule[-1]
        assert math.isclose(a + b + c, 1.0, abs_tol=1e-6), name
    a, b, c = YOU[-1]
    t = (-b - math.sqrt(b * b - 4 * c * (a - 1))) / (2 * c)  # smaller root of c t² + b t + a - 1
    assert 0.99 < math.sqrt(t) < 1.0


# --------------------------------------------------------------------------------------------
# resolve_schedule
# --------------------------------------------------------------------------------------------


def test_resolve_schedule_constant_presets() -> None:
    for name in ("keller", "taylor", "cubic"):
        for steps in (1, 5, 9):
            sched = resolve_schedule(name, steps)
            assert sched == [PRESETS[name].schedule[0]] * steps


def test_resolve_schedule_repeats_last_entry() -> None:
    sched = resolve_schedule("you", 9)
    assert sched[:6] == list(YOU)
    assert sched[6:] == [YOU[-1]] * 3
    pe = resolve_schedule("polar_express", 11)
    assert pe[:8] == list(POLAR_EXPRESS) and pe[8:] == [TAYLOR] * 3
    custom = resolve_schedule([(1, 2, 3), (4, 5, 6)], 4)
    assert custom == [(1.0, 2.0, 3.0), (4.0, 5.0, 6.0), (4.0, 5.0, 6.0), (4.0, 5.0, 6.0)]
    assert all(isinstance(v, float) for t in custom for v in t)


def test_resolve_schedule_truncates() -> None:
    assert resolve_schedule("you", 5) == list(YOU[:5])
    assert resolve_schedule("polar_express", 1) == [POLAR_EXPRESS[0]]
    assert resolve_schedule([(1, 2, 3), (4, 5, 6), (7, 8, 9)], 2) == [(1.0, 2.0, 3.0), (4.0, 5.0, 6.0)]


def test_resolve_schedule_single_triple_and_names() -> None:
    assert resolve_schedule((3.4445, -4.7750, 2.0315), 2) == [KELLER, KELLER]
    assert resolve_schedule([1.5, -0.5, 0], 3) == [CUBIC] * 3
    assert resolve_schedule("KELLER", 1) == [KELLER]
    assert resolve_schedule("polar-express", 2) == list(POLAR_EXPRESS[:2])
    # the docstring example
    assert resolve_schedule("keller", 2) == [(3.4445, -4.775, 2.0315), (3.4445, -4.775, 2.0315)]


@pytest.mark.parametrize("steps,exc", [(0, ValueError), (-3, ValueError), (2.0, TypeError), (True, TypeError)])
def test_resolve_schedule_bad_steps(steps: object, exc: type) -> None:
    with pytest.raises(exc, match="steps"):
        resolve_schedule("keller", steps)  # type: ignore[arg-type]


def test_resolve_schedule_unknown_preset_lists_valid() -> None:
    with pytest.raises(ValueError) as info:
        resolve_schedule("newton", 5)
    msg = str(info.value)
    assert "'newton'" in msg
    for name in PRESETS:
        assert name in msg


@pytest.mark.parametrize(
    "coefficients,exc",
    [
        ((1.0, 2.0), ValueError),
        ((1.0, 2.0, 3.0, 4.0), ValueError),
        ((1.0, float("nan"), 3.0), ValueError),
        ((float("inf"), 0.0, 0.0), ValueError),
        ([(1.0, 2.0, 3.0), (1.0, 2.0)], ValueError),
        ([], ValueError),
        (("a", "b", "c"), TypeError),
        ([(1.0, 2.0, 3.0), None], TypeError),
        (torch.tensor([1.5, -0.5, 0.0]), TypeError),
    ],
)
def test_resolve_schedule_bad_coefficients(coefficients: object, exc: type) -> None:
    with pytest.raises(exc, match="coefficients"):
        resolve_schedule(coefficients, 3)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# scalar_map
# --------------------------------------------------------------------------------------------


def test_scalar_map_one_step_is_the_polynomial() -> None:
    x = torch.linspace(-1, 1, 101, dtype=torch.float64)
    a, b, c = KELLER
    torch.testing.assert_close(scalar_map(x, [KELLER]), a * x + b * x**3 + c * x**5, rtol=0, atol=1e-14)
    # odd: g(-x) = -g(x), g(0) = 0
    x = torch.linspace(0, 1, 101, dtype=torch.float64)
    sched = resolve_schedule("polar_express", 5)
    torch.testing.assert_close(scalar_map(-x, sched), -scalar_map(x, sched), rtol=0, atol=0)
    assert float(scalar_map(torch.zeros(1, dtype=torch.float64), resolve_schedule("keller", 5))) == 0.0


def test_scalar_map_composes() -> None:
    x = torch.linspace(0, 1, 257, dtype=torch.float64)
    sched = resolve_schedule("you", 6)
    torch.testing.assert_close(scalar_map(scalar_map(x, sched[:2]), sched[2:]), scalar_map(x, sched), rtol=0, atol=1e-13)


# measured on x in [lo, 1] (100 001 points): min and max of g^(k)(x)
SCALAR_BANDS = [
    ("keller", 5, 0.01, 0.6818, 1.1344),
    ("keller", 5, 0.001, 0.4705, 1.2024),
    ("you", 5, 0.01, 0.7645, 1.0200),
    ("you", 6, 0.01, 0.9956, 0.9993),
    ("polar_express", 5, 0.001, 0.8462, 1.1236),
    ("polar_express", 6, 0.001, 0.9944, 1.0012),
    ("taylor", 8, 0.05, 0.99999, 1.0),
    ("cubic", 8, 0.05, 0.8892, 1.0),
]


@pytest.mark.parametrize("preset,steps,lo,ymin,ymax", SCALAR_BANDS)
def test_scalar_map_bands(preset: str, steps: int, lo: float, ymin: float, ymax: float) -> None:
    x = torch.linspace(lo, 1, 100_001, dtype=torch.float64)
    y = scalar_map(x, resolve_schedule(preset, steps))
    assert abs(float(y.min()) - ymin) < 2e-3, float(y.min())
    assert abs(float(y.max()) - ymax) < 2e-3, float(y.max())


def test_polar_express_meets_its_design_range() -> None:
    # designed for σ in [1e-3, 1]: after the 8 published steps every such σ is at 1 to ~1e-6
    x = torch.logspace(-3, 0, 10_001, dtype=torch.float64)
    y = scalar_map(x, resolve_schedule("polar_express", 8))
    assert float((y - 1).abs().max()) < 1e-6
    # below the design range convergence is not promised
    assert float(scalar_map(torch.tensor([1e-5], dtype=torch.float64), resolve_schedule("polar_express", 8))) < 0.5


def test_taylor_and_cubic_are_monotone_into_unit_interval() -> None:
    x = torch.linspace(0, 1, 10_001, dtype=torch.float64)
    for name in ("taylor", "cubic"):
        for steps in (1, 5, 20):
            y = scalar_map(x, resolve_schedule(name, steps))
            assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0 + 1e-15
            assert bool((y[1:] >= y[:-1] - 1e-15).all())


def test_you_converges_to_its_fixed_point_not_one() -> None:
    # repeating You's last step converges to its fixed point ~0.9968, not exactly 1
    x = torch.tensor([0.01, 0.1, 0.5, 1.0], dtype=torch.float64)
    y = scalar_map(x, resolve_schedule("you", 30))
    assert float((y - y.mean()).abs().max()) < 1e-6
    assert 0.99 < float(y.mean()) < 0.999


# --------------------------------------------------------------------------------------------
# the fitter
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted() -> FitResult:
    return fit_coefficients((32, 32), 5, n_matrices=2, iterations=200, progress=False, seed=0)


def test_fit_improves_objective(fitted: FitResult) -> None:
    assert isinstance(fitted, FitResult)
    assert fitted.shape == (32, 32) and fitted.steps == 5
    assert len(fitted.history) == 200
    assert math.isfinite(fitted.loss) and math.isfinite(fitted.initial_loss)
    # measured 0.0167 -> 0.0040 (300 iterations, 4 matrices); ask for a clear improvement
    assert fitted.loss < 0.6 * fitted.initial_loss
    assert fitted.history[0] == pytest.approx(fitted.initial_loss)
    assert min(fitted.history) < fitted.initial_loss


def test_fit_parametrisation_is_consistent(fitted: FitResult) -> None:
    a, b, c = fitted.coefficients
    k, x1, x2 = fitted.k_x1_x2
    assert a == pytest.approx(1 + k * x1**2 * x2**2)
    assert b == pytest.approx(-k * (x1**2 + x2**2))
    assert c == pytest.approx(k)
    # x1 and x2 are fixed points of the fitted quintic
    for x in (x1, x2):
        g = float(scalar_map(torch.tensor([x], dtype=torch.float64), [fitted.coefficients]))
        assert g == pytest.approx(x, abs=1e-12)


def test_fit_loss_matches_scalar_map_on_the_same_samples(fitted: FitResult) -> None:
    from muonlab.coefficients import _sample_singular_values

    sigma = _sample_singular_values((32, 32), 2, torch.Generator().manual_seed(0))
    y = scalar_map(sigma, [fitted.coefficients] * 5)
    assert float(((y - 1) ** 2).mean()) == pytest.approx(fitted.loss, rel=1e-9)
    y0 = scalar_map(sigma, [(1 + 1.5 * 0.81 * 1.44, -1.5 * (0.81 + 1.44), 1.5)] * 5)  # init (1.5, 0.9, 1.2)
    assert float(((y0 - 1) ** 2).mean()) == pytest.approx(fitted.initial_loss, rel=1e-9)


def test_fit_reproducible_with_seed(fitted: FitResult) -> None:
    again = fit_coefficients((32, 32), 5, n_matrices=2, iterations=200, progress=False, seed=0)
    assert again.coefficients == fitted.coefficients
    assert again.history == fitted.history
    other = fit_coefficients((32, 32), 5, n_matrices=2, iterations=200, progress=False, seed=1)
    assert other.coefficients != fitted.coefficients


def test_fit_progress_false_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    fit_coefficients((16, 16), 3, n_matrices=1, iterations=5, progress=False)
    out, err = capsys.readouterr()
    assert out == "" and err == ""


@pytest.mark.parametrize(
    "kwargs",
    [
        {"shape": (0, 5)},
        {"shape": (5,)},
        {"steps": 0},
        {"iterations": 0},
    ],
)
def test_fit_bad_arguments(kwargs: dict) -> None:
    args = {"shape": (8, 8), "steps": 2, "iterations": 2, "n_matrices": 1, "progress": False}
    args.update(kwargs)
    with pytest.raises(ValueError):
        fit_coefficients(**args)
