"""The Triton backend's launch plumbing: the persistent grids and the scale step."""

import pytest
import torch

triton = pytest.importorskip("triton")

from siri.kernels.triton_backend import INTERPRETER_PROGRAMS, rows_in_flight_on, scale_unless_one_  # noqa: E402
from siri.kernels.triton_kernels import rereads_row, row_tiling  # noqa: E402


def test_rows_in_flight_fit_l2():
    # H100 at Qwen2's vocabulary in bf16: one CTA per SM, 132 rows of 304 KB = 38 MiB of 50 MiB.
    assert rows_in_flight_on(132, 50 << 20, 151_936 * 2) == 132
    # Short rows: two CTAs per SM (the cap), still a fraction of L2.
    assert rows_in_flight_on(132, 50 << 20, 20_000 * 2) == 264
    # Never fewer than one per SM, even where the rows do not fit (fp32 at V = 151,936).
    assert rows_in_flight_on(132, 50 << 20, 151_936 * 4) == 132


def test_rows_on_chip_are_not_reread():
    assert not rereads_row(16_384) and row_tiling(16_384) == (16_384, 16)
    assert rereads_row(16_385) and row_tiling(16_385) == (8192, 16)
    assert row_tiling(1) == (1, 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's short grid is a CPU-only setting")
@pytest.mark.parametrize("scale", [1.0, -2.5])
def test_scale_step_covers_every_row(scale):
    # More rows than programs, rows longer than one tile, a strided view: every element scaled once.
    num_rows = 2 * INTERPRETER_PROGRAMS + 1
    wide = torch.randn(num_rows, 20_100)
    grad = wide[:, :20_000]
    expected = grad * scale
    scale_unless_one_(grad, torch.tensor(scale))
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)
