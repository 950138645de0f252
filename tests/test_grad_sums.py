"""The column-sums kernel behind the fused training path's γ/β gradients.

On the CPU the kernel runs in Triton's interpreter (switched on before the kernel is defined, so in a child
process); ``tests/test_gpu.py`` runs it compiled. ``column_sums`` itself falls back to torch off CUDA.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from conftest import run_in_triton_interpreter
from ssf_tasks.grad_sums import column_sums

CHECK = """
import json
import torch
from ssf_tasks import grad_sums

torch.manual_seed(0)
errors = {}
for shape in [(3, 50, 40), (7, 129), (300, 200), (2, 1, 5), (16385, 130)]:  # the last: many rows per chunk
    dy, other = torch.randn(shape).half(), torch.randn(shape).half()
    sums = grad_sums._column_sums_op(dy, other)  # the Triton kernel, interpreted
    rows, cols = dy.double().reshape(-1, shape[-1]), other.double().reshape(-1, shape[-1])
    expected = rows.sum(0), (rows * cols).sum(0)
    errors[str(shape)] = [float((s.double() - e).abs().max() / e.abs().max()) for s, e in zip(sums, expected)]
    assert all(s.dtype == torch.float32 and s.shape == (shape[-1],) for s in sums)
print(json.dumps(errors))
"""


def test_kernel_matches_fp64_sums_in_the_interpreter():
    pytest.importorskip("triton")
    errors = run_in_triton_interpreter(CHECK)
    assert len(errors) == 5
    assert all(error < 1e-5 for pair in errors.values() for error in pair), errors  # fp32 sums of fp16 values


def test_torch_fallback_sums_every_row_per_channel():
    dy = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]])
    other = torch.full_like(dy, 2.0)
    sum_dy, sum_prod = column_sums(dy, other)
    assert_close(sum_dy, torch.tensor([16.0, 20.0]))
    assert_close(sum_prod, torch.tensor([32.0, 40.0]))


def test_shapes_must_match():
    with pytest.raises(ValueError, match="one shape"):
        column_sums(torch.zeros(2, 3), torch.zeros(3, 3))
