"""Layer 1 command line: ``muonlab ns-convergence`` and ``muonlab fit-coefficients``."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from muonlab import METHODS, PRESETS
from muonlab.cli import main
from muonlab.lab.analysis.convergence import make_test_matrix, ns_convergence, parse_shape



@pytest.fixture(scope="module")
def convergence_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One ns-convergence run with --json and --plot, shared by the tests that read its output."""
    tmp = tmp_path_factory.mktemp("nsconv")
    js, png = tmp / "conv.json", tmp / "conv.png"
    buf_out, buf_err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(buf_out), contextlib.redirect_stderr(buf_err):
        rc = main(["ns-convergence", "--shape", "64x96", "--steps", "3", "--json", str(js), "--plot", str(png)])
    return {"rc": rc, "json": js, "png": png, "out": buf_out.getvalue(), "err": buf_err.getvalue()}


def test_ns_convergence_returns_zero_and_prints_table(convergence_run: dict) -> None:
    assert convergence_run["rc"] == 0
    out = convergence_run["out"]
    assert "64x96" in out
    for name in list(PRESETS) + [m for m in METHODS if m != "auto"]:  # "auto" selects one of them
        assert name in out
    assert "err@1" in out and "err@3" in out and "err@5" not in out
    assert f"wrote {convergence_run['json']}" in out
    assert f"wrote {convergence_run['png']}" in out


def test_ns_convergence_json_is_sane(convergence_run: dict) -> None:
    data = json.loads(Path(convergence_run["json"]).read_text())
    assert data["meta"] == {"shape": [64, 96], "steps": 3, "seed": 0, "spectrum": "gaussian", "dtype": "fp32"}
    rows = data["rows"]
    keys = {(r["method"], r["preset"]) for r in rows}
    assert {("newton_schulz", p) for p in PRESETS} <= keys
    assert {("gram", "keller"), ("inverse_sqrt", "-"), ("svd", "-"), ("svd_inv_sqrt", "-")} <= keys
    for r in rows:
        assert len(r["errors"]) == 3
        assert all(math.isfinite(e) and 0 <= e < 2 for e in r["errors"])
        assert 0 <= r["sigma_min"] <= r["sigma_max"] < 3
    by = {(r["method"], r["preset"]): r for r in rows}
    svd = by[("svd", "-")]
    assert max(svd["errors"]) < 1e-5
    assert abs(svd["sigma_min"] - 1) < 1e-5 and abs(svd["sigma_max"] - 1) < 1e-5
    assert max(by[("svd_inv_sqrt", "-")]["errors"]) < 1e-4
    # Keller: error falls with each step (measured 0.645, 0.275, 0.189)
    ke = by[("newton_schulz", "keller")]["errors"]
    assert ke[0] > ke[1] > ke[2] and ke[2] < 0.3
    # gram runs the same iteration as newton_schulz; inverse_sqrt is the cubic iteration
    for a, b in zip(by[("gram", "keller")]["errors"], ke):
        assert a == pytest.approx(b, rel=1e-3)
    for a, b in zip(by[("inverse_sqrt", "-")]["errors"], by[("newton_schulz", "cubic")]["errors"]):
        assert a == pytest.approx(b, rel=1e-3)


def test_ns_convergence_png_written(convergence_run: dict) -> None:
    png = Path(convergence_run["png"])
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000


def test_ns_convergence_markdown_and_powerlaw(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["ns-convergence", "--shape", "32x48", "--steps", "2", "--markdown", "--spectrum", "powerlaw"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "powerlaw" in out
    lines = [ln for ln in out.splitlines() if ln.startswith("|")]
    assert lines[0].startswith("| method") and set(lines[1]) <= {"|", "-"}
    assert len(lines) == 2 + len(PRESETS) + 4  # header, separator, presets, gram, inverse_sqrt, 2 svd


@pytest.mark.parametrize("shape", ["64by3", "64x", "0x3", "12x34x5", "axb", "-4x4"])
def test_ns_convergence_bad_shape_exit_code_2(shape: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["ns-convergence", f"--shape={shape}", "--steps", "2"])
    out, err = capsys.readouterr()
    assert rc == 2
    assert "ns-convergence: error" in err
    assert "MxN" in err and repr(shape) in err
    assert "Traceback" not in err


@pytest.mark.parametrize("steps", ["0", "-1"])
def test_ns_convergence_bad_steps_exit_code_2(steps: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["ns-convergence", "--shape", "16x16", "--steps", steps])
    err = capsys.readouterr().err
    assert rc == 2
    assert "steps" in err


def test_ns_convergence_argparse_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["ns-convergence", "--dtype", "fp8"], ["ns-convergence", "--spectrum", "uniform"], ["nope"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
    capsys.readouterr()


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "ns-convergence" in out and "fit-coefficients" in out


def test_fit_coefficients_quiet(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["fit-coefficients", "--shape", "32x32", "--iterations", "50", "--quiet", "--matrices", "2"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert err == ""  # --quiet: no progress bar
    m = re.search(r"a=(-?\d+\.\d+) b=(-?\d+\.\d+) c=(-?\d+\.\d+)", out)
    assert m, out
    a, b, c = (float(v) for v in m.groups())
    assert 1 < a < 5 and -8 < b < 0 and 0 < c < 5
    m = re.search(r"objective (\S+) -> (\S+)", out)
    assert m and float(m.group(2)) < float(m.group(1))
    assert out.count("(") >= len(PRESETS) + 1
    for name in ["fitted", *PRESETS]:
        assert re.search(rf"^{name}\s", out, re.M), name


def test_fit_coefficients_bad_shape(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fit-coefficients", "--shape", "32", "--iterations", "5", "--quiet"]) == 2
    assert "MxN" in capsys.readouterr().err


def test_parse_shape() -> None:
    assert parse_shape("1024x768") == (1024, 768)
    assert parse_shape("64X96") == (64, 96)
    assert parse_shape("8*4") == (8, 4)
    for bad in ("", "64", "64x0", "x", "1.5x2"):
        with pytest.raises(ValueError, match="MxN"):
            parse_shape(bad)


def test_make_test_matrix_spectra() -> None:
    G = make_test_matrix((24, 40), seed=3, spectrum="powerlaw")
    s = torch.linalg.svdvals(G)
    torch.testing.assert_close(s, 1.0 / torch.arange(1, 25, dtype=torch.float64), rtol=1e-10, atol=0)
    torch.testing.assert_close(make_test_matrix((24, 40), seed=3), make_test_matrix((24, 40), seed=3), rtol=0, atol=0)
    with pytest.raises(ValueError, match="spectrum"):
        make_test_matrix((4, 4), spectrum="flat")


def test_ns_convergence_function_rejects_bad_steps() -> None:
    with pytest.raises(ValueError, match="steps"):
        ns_convergence((8, 8), 0)


def test_module_entry_point_help() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "muonlab", "ns-convergence", "--help"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    for flag in ("--shape", "--steps", "--spectrum", "--plot", "--json", "--markdown"):
        assert flag in res.stdout


@pytest.mark.parametrize("flag", ["--matrices", "--iterations", "--steps"])
def test_fit_coefficients_zero_counts_are_clear_errors(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    # issue 13: --matrices 0 ended in a raw "torch.cat(): expected a non-empty list of Tensors"
    assert main(["fit-coefficients", "--shape", "8x8", "--iterations", "2", "--quiet", flag, "0"]) == 2
    err = capsys.readouterr().err
    assert err == f"muonlab fit-coefficients: error: {flag} must be a positive integer, got 0\n"


def test_fit_coefficients_function_rejects_no_matrices() -> None:
    from muonlab.coefficients import fit_coefficients

    with pytest.raises(ValueError, match="n_matrices must be >= 1"):
        fit_coefficients((8, 8), 2, n_matrices=0, iterations=1, progress=False)
