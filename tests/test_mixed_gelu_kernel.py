"""fc1's per-sample SSF with GELU in mixed-batch inference: the Triton kernel (in the interpreter) and the module path.

tests/test_gpu.py runs the kernel compiled, and checks that a mixed batch on CUDA takes it.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from conftest import make_backbone, make_images, run_in_triton_interpreter
from ssf_tasks import MultiTaskSSF
from ssf_tasks.adapters import vit_mlp
from ssf_tasks.kernels.mixed_gelu import mixed_ssf_gelu, mixed_ssf_gelu_reference

KERNEL_CHECK = """
import json
import torch
from ssf_tasks.kernels import mixed_gelu

torch.manual_seed(0)
errors = {}
mixed_gelu._MIN_PROGRAMS_PER_SM = 0  # each tile's own tokens per program, at any batch
default = (mixed_gelu._BLOCK_R, mixed_gelu._BLOCK_C, mixed_gelu._WARPS, mixed_gelu._TOKENS, mixed_gelu._STAGES)
# token counts that are not a whole number of row blocks, channels that are not a whole column block (or are)
shapes = [(3, 197, 200), (2, 13, 64), (4, 5, 2048), (1, 40, 96)]
# the submitted tile; one row per program; chunks of tokens that end inside a tile; every token in one program
for tile in [default, (1, 64, 4, 1, 1), (4, 32, 2, 10, 2), (16, 128, 4, 0, 3)]:
    mixed_gelu._BLOCK_R, mixed_gelu._BLOCK_C, mixed_gelu._WARPS, mixed_gelu._TOKENS, mixed_gelu._STAGES = tile
    for batch, tokens, channels in shapes:
        for dtype, table_dtype in [(torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16)]:
            y = (2 * torch.randn(batch, tokens, channels)).to(dtype)
            scale = (1 + 0.3 * torch.randn(6, channels)).to(table_dtype)
            shift = (0.5 * torch.randn(6, channels)).to(table_dtype)
            rows = torch.randint(0, 6, (2 * batch,))[::2]  # strided, as a column of a label table would be
            expected = mixed_gelu.mixed_ssf_gelu_reference(y, scale, shift, rows).double()
            result = mixed_gelu._mixed_ssf_gelu_op(y, scale, shift, rows).double()
            # in steps of the output's rounding (2**-10 fp16, 2**-7 bf16), against the value or 1% of the largest
            step = 2**-10 if dtype == torch.float16 else 2**-7
            steps = (result - expected).abs() / (expected.abs() + 0.01 * expected.abs().max()) / step
            errors[f"{tile}/{batch}x{tokens}x{channels}/{dtype}"] = float(steps.max())
    one_task = torch.tensor([4]).expand(3)  # stride 0
    y = torch.randn(3, 9, scale.shape[1]).half()
    result = mixed_gelu._mixed_ssf_gelu_op(y, scale, shift, one_task).double()
    expected = mixed_gelu.mixed_ssf_gelu_reference(y, scale, shift, one_task.contiguous()).double()
    errors[f"{tile}/expanded task"] = float(((result - expected).abs() / (expected.abs() + 1e-2) / 2**-10).max())
print(json.dumps(errors))
"""


def test_kernel_matches_the_reference_in_the_interpreter():
    pytest.importorskip("triton")
    errors = run_in_triton_interpreter(KERNEL_CHECK)
    assert len(errors) == 4 * (4 * 2 + 1)
    assert all(steps <= 1.0 for steps in errors.values()), errors  # at most one rounding step apart


@pytest.mark.parametrize(
    ("batch", "tokens", "column_blocks", "chunk"),
    [(256, 197, 3, 16), (8, 197, 3, 4), (1, 197, 3, 1), (6, 197, 3, 2), (64, 5, 3, 1), (1000, 1, 1, 1), (2, 197, 1, 1)],
)
def test_small_batches_take_fewer_tokens_per_program(batch, tokens, column_blocks, chunk):
    from ssf_tasks.kernels import mixed_gelu

    assert (mixed_gelu._TOKENS, mixed_gelu._BLOCK_R) == (16, 1)
    assert mixed_gelu._tokens_per_program(batch, tokens, column_blocks, 1024) == chunk


def test_reference_is_ssf_then_gelu_per_sample():
    generator = torch.Generator().manual_seed(0)
    y = torch.randn(3, 5, 8, generator=generator, dtype=torch.float64)
    scale, shift = torch.randn(4, 8, generator=generator).double(), torch.randn(4, 8, generator=generator).double()
    rows = torch.tensor([2, 0, 2])
    result = mixed_ssf_gelu(y, scale, shift, rows)  # on the CPU: the reference
    for sample, task in enumerate(rows.tolist()):
        expected = torch.nn.functional.gelu(y[sample] * scale[task] + shift[task])
        assert_close(result[sample], expected, rtol=1e-12, atol=1e-12)
    half = mixed_ssf_gelu(y.half(), scale, shift, rows)  # computed in fp32, rounded once
    assert half.dtype == torch.float16
    assert_close(half, mixed_ssf_gelu(y.half().double(), scale, shift, rows).half())


def test_mixed_gelu_path_equals_timm_mlp(monkeypatch):
    """The mixed-batch path (raw fc1, then SSF with GELU in one call) gives timm's ``Mlp`` outputs.

    The Triton kernel needs CUDA; here its reference stands in for it, so what is tested is everything around
    it: which modules take the path, with which tables and rows, and ``fc2`` after it.
    """
    calls = []

    def reference(y, scale_table, shift_table, task_rows):
        calls.append((tuple(y.shape), scale_table.data_ptr(), tuple(task_rows.tolist())))
        return mixed_ssf_gelu_reference(y, scale_table, shift_table, task_rows)

    monkeypatch.setattr(vit_mlp, "mixed_gelu_available", lambda x, dtype=None: True)
    monkeypatch.setattr(vit_mlp, "mixed_ssf_gelu", reference)
    model = MultiTaskSSF(make_backbone("vit"), sigma=0.3)
    generator = torch.Generator().manual_seed(0)
    for name in "abc":
        model.add_task(name, 4, generator=generator)
    images = make_images("vit")
    tasks = torch.tensor([2, 0, 2], device=images.device)
    with torch.no_grad():
        fused = model(images, tasks)
        model.set_mixed_gelu(False)
        timm_mlp = model(images, tasks)
        model.set_mixed_gelu(True)
        model(images, "b")  # one task per batch: never the mixed path
    blocks = model.backbone.blocks
    assert [c[1] for c in calls] == [blk.mlp.fc1.ssf_scale.data_ptr() for blk in blocks]  # each block's own table
    assert all(c[2] == (2, 0, 2) for c in calls)
    assert_close(fused, timm_mlp, rtol=1e-5, atol=1e-5)
    with torch.enable_grad():
        calls.clear()
        model(images, tasks).sum().backward()  # training on a mixed batch: timm's forward, gradients flow
    assert calls == [] and model.backbone.blocks[0].mlp.fc1.ssf_scale.grad is not None
