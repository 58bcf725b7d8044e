"""The OpenBLAS preload (toss_mlx.blas): which library MLX's cblas_sgemm binds to, and correct results.

The binding is read from the dynamic linker itself (glibc's LD_DEBUG=bindings),
not inferred from speed: no timing here. Each case runs in a fresh interpreter,
since the preload only works before mlx.core is first imported.
"""

import os
import subprocess
import sys

import pytest

from toss_mlx import blas

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the BLAS preload is Linux-only")

OPENBLAS = blas.find_openblas()
needs_openblas = pytest.mark.skipif(OPENBLAS is None, reason="no OpenBLAS installed (libopenblas0-pthread)")

MATMUL = """
import toss_mlx, mlx.core as mx
a = mx.ones((64, 64))
mx.eval(a @ a)
print(toss_mlx.blas.status[1])
"""


def python(code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != blas.ENV_VAR} | env
    result = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return result


def sgemm_binding(tmp_path, **env: str) -> str:
    """The library the dynamic linker bound MLX's cblas_sgemm to, in a fresh process."""
    log = tmp_path / "ld"
    python(MATMUL, LD_DEBUG="bindings", LD_DEBUG_OUTPUT=str(log), **env)
    lines = [line for f in tmp_path.glob("ld.*") for line in f.read_text().splitlines()
             if "`cblas_sgemm'" in line and "libmlx" in line]
    if not lines:
        pytest.skip("the dynamic linker does not log bindings here (not glibc?)")
    return lines[0].split(" to ")[1].split(" [")[0]


def test_status_of_this_process():
    if os.environ.get(blas.ENV_VAR):
        pytest.skip(f"{blas.ENV_VAR} is set for this test run")
    path, reason = blas.status
    if OPENBLAS is None:
        assert path is None and "no OpenBLAS found" in reason
    else:
        assert (path, reason) == (OPENBLAS, "preloaded")
        maps = open("/proc/self/maps").read()
        assert os.path.realpath(OPENBLAS) in maps


@needs_openblas
def test_mlx_sgemm_binds_to_openblas(tmp_path):
    assert os.path.realpath(sgemm_binding(tmp_path)) == os.path.realpath(OPENBLAS)


@needs_openblas
def test_toss_mlx_blas_none_disables_the_preload(tmp_path):
    bound = sgemm_binding(tmp_path, TOSS_MLX_BLAS="none")
    assert "openblas" not in bound.lower()
    assert python(MATMUL, TOSS_MLX_BLAS="none").stdout.strip() == "disabled by TOSS_MLX_BLAS=none"


def test_a_library_that_does_not_load_is_reported():
    out = python(MATMUL, TOSS_MLX_BLAS="/nonexistent/libopenblas.so").stdout
    assert out.startswith("could not load /nonexistent/libopenblas.so")


def test_importing_mlx_first_is_reported():
    out = python("import mlx.core, toss_mlx; print(toss_mlx.blas.status[1])").stdout
    assert "mlx.core was imported before toss_mlx" in out


@needs_openblas
def test_mlx_matmul_is_correct_with_openblas():
    """Odd shapes, transposed operands and a batch, against numpy in float64."""
    code = """
import toss_mlx, mlx.core as mx, numpy as np
assert toss_mlx.blas.status[1] == "preloaded", toss_mlx.blas.status
rng = np.random.default_rng(0)
a = rng.normal(size=(3, 129, 67)).astype(np.float32)
b = rng.normal(size=(3, 67, 250)).astype(np.float32)
cases = [
    (mx.array(a) @ mx.array(b), a.astype(np.float64) @ b),
    (mx.array(a[0]).T @ mx.array(a[1]), a[0].T.astype(np.float64) @ a[1]),
    (mx.array(b[0]).T @ mx.array(b[1]), b[0].T.astype(np.float64) @ b[1]),
]
print(max(float(np.abs(np.array(got) - want).max() / np.abs(want).max()) for got, want in cases))
"""
    assert float(python(code).stdout) < 1e-5
