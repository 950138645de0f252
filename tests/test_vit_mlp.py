"""fc1's SSF and GELU as one op in training: the Triton kernel (in the interpreter), the module swap, the fold."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import Mlp
from torch import nn
from torch.testing import assert_close

from conftest import make_backbone, make_images, run_in_triton_interpreter
from ssf_tasks import MultiTaskSSF
from ssf_tasks.adapters.vit_mlp import FusedGeluMlp
from ssf_tasks.kernels import gelu_backward
from ssf_tasks.kernels.gelu_backward import gelu_backward_sums

KERNEL_CHECK = """
import json
import torch
from ssf_tasks.kernels import gelu_backward as kernel

torch.manual_seed(0)
errors = {}
# rows that are not a whole number of row blocks or chunks, channels that are not a whole column block
shapes = [(3, 70, 200), (2, 197, 64), (1000, 130), (5, 33)]
default = (kernel._BLOCK_R, kernel._BLOCK_C, kernel._WARPS, kernel._PROGRAMS_PER_SM)
tiles = [default, (32, 64, 4, 3), (4, 128, 4, 1)]  # the submitted tile; 2-D tiles; one chunk of rows
for block_r, block_c, warps, programs in tiles:
    kernel._BLOCK_R, kernel._BLOCK_C, kernel._WARPS, kernel._PROGRAMS_PER_SM = block_r, block_c, warps, programs
    for shape in shapes:
        dout, y = torch.randn(*shape), 2 * torch.randn(*shape)
        expected = kernel._gelu_backward_sums_torch(dout.double(), y.double())
        result = kernel._gelu_backward_sums_op(dout, y)
        for name, a, b in zip(("dy", "sum_dy", "sum_dy_y"), result, expected):
            errors[f"{block_r}x{block_c}/{shape}/{name}"] = float((a.double() - b).abs().max() / b.abs().max())
        # bf16: dy is rounded as torch rounds it, and the sums are those of the rounded dy
        dout, y = dout.bfloat16(), y.bfloat16()
        expected = kernel._gelu_backward_sums_torch(dout, y)
        result = kernel._gelu_backward_sums_op(dout, y)
        a, b = result[0].float(), expected[0].float()
        # in bf16 steps (2**-7 relative at most), counted against the value or 1% of the largest, if larger
        steps = (a - b).abs() / (b.abs() + 0.01 * b.abs().max()) / 2**-7
        errors[f"{block_r}x{block_c}/{shape}/bf16 dy"] = float(steps.max())
        for name, a, b in zip(("sum_dy", "sum_dy_y"), result[1:], expected[1:]):
            errors[f"{block_r}x{block_c}/{shape}/bf16 {name}"] = float((a - b).abs().max() / b.abs().max())
    # fp16
    dout, y = torch.randn(3, 70, 200).half(), (2 * torch.randn(3, 70, 200)).half()
    expected = kernel._gelu_backward_sums_torch(dout.double(), y.double())
    result = kernel._gelu_backward_sums_op(dout, y)
    for name, a, b in zip(("dy", "sum_dy", "sum_dy_y"), result, expected):
        errors[f"{block_r}x{block_c}/fp16/{name}"] = float((a.double() - b).abs().max() / b.abs().max())
print(json.dumps(errors))
"""


def test_kernel_matches_gelu_backward_and_its_sums_in_the_interpreter():
    pytest.importorskip("triton")
    errors = run_in_triton_interpreter(KERNEL_CHECK)
    assert len(errors) == 3 * (4 * 6 + 3)
    fp16 = {k: v for k, v in errors.items() if "fp16" in k}
    assert all(v < 2e-3 for v in fp16.values()), fp16  # fp16 rounding of dy and y
    fp32 = {k: v for k, v in errors.items() if "bf16" not in k and "fp16" not in k}
    assert all(v < 1e-6 for v in fp32.values()), fp32  # fp32 against fp64
    bf16_dy = {k: v for k, v in errors.items() if "bf16 dy" in k}
    assert all(v <= 1.0 for v in bf16_dy.values()), bf16_dy  # at most one bf16 step apart from torch's
    bf16_sums = {k: v for k, v in errors.items() if "bf16 sum" in k}
    assert all(v < 2e-2 for v in bf16_sums.values()), bf16_sums


def test_torch_version_is_gelu_backward_with_its_sums():
    dout, y = torch.randn(2, 9, 6, dtype=torch.float64), torch.randn(2, 9, 6, dtype=torch.float64)
    y.requires_grad_(True)
    torch.nn.functional.gelu(y).backward(dout)
    dy, sum_dy, sum_dy_y = gelu_backward_sums(dout, y.detach())
    assert_close(dy, y.grad)
    assert_close(sum_dy, y.grad.sum((0, 1)))
    assert_close(sum_dy_y, (y.grad * y.detach()).sum((0, 1)))
    with pytest.raises(ValueError, match="one shape"):
        gelu_backward_sums(dout, y.detach()[:1])


def test_vit_mlps_take_the_fused_class_and_the_fold_gives_timm_back():
    backbone = timm.create_model("test_vit", num_classes=0)
    model = MultiTaskSSF(backbone)
    model.add_task("a", 3)
    adopted = [m for m in model.backbone.modules() if type(m) is FusedGeluMlp]
    assert len(adopted) == len(model.backbone.blocks) and all(isinstance(m, Mlp) for m in adopted)
    folded = model.fold("a")
    assert not any(type(m) is FusedGeluMlp for m in folded.modules())
    assert sum(type(m) is Mlp for m in folded.modules()) == len(adopted)


def test_mlps_without_exact_gelu_keep_timm_class():
    backbone = timm.create_model("test_vit", num_classes=0)
    backbone.blocks[0].mlp.act = nn.GELU(approximate="tanh")
    backbone.blocks[1].mlp.act = nn.SiLU()
    model = MultiTaskSSF(backbone)
    assert [type(b.mlp) for b in model.backbone.blocks] == [Mlp, Mlp] + [FusedGeluMlp] * (len(backbone.blocks) - 2)


@pytest.mark.parametrize("fast", [True, False])
def test_fused_mlp_runs_once_per_block_on_the_fast_path_only(fast, monkeypatch):
    """The fused op is what the fast path runs (its gradients are checked against the eager path in
    test_model.test_fast_path_matches_eager_outputs_and_gradients), and the eager path never runs it."""
    calls = []
    original = gelu_backward.gelu_backward_sums
    monkeypatch.setattr("ssf_tasks.kernels.frozen_op.gelu_backward_sums", lambda *a: calls.append(1) or original(*a))
    model = MultiTaskSSF(make_backbone("vit"))
    model.add_task("a", 4)
    model.set_fast_path(fast)
    model.train()
    images = make_images("vit")
    model(images, "a")[:, :4].sum().backward()
    assert len(calls) == (len(model.backbone.blocks) if fast else 0)
    # a mixed batch never takes the fast path
    calls.clear()
    model.add_task("b", 2)
    model(images, ["a", "b", "a"]).nan_to_num(neginf=0).sum().backward()
    assert calls == []


def test_fast_path_without_gradients_and_with_a_norm_inside_the_mlp_matches_eager():
    """No-grad single-task inference takes the fused op too; an MLP with its own norm keeps timm's order."""
    backbone = make_backbone("vit")
    hidden = backbone.blocks[0].mlp.fc1.out_features
    backbone.blocks[0].mlp.norm = nn.LayerNorm(hidden)  # timm's norm_layer: between the activation and fc2
    torch.manual_seed(0)
    nn.init.normal_(backbone.blocks[0].mlp.norm.weight, 1.0, 0.3)
    model = MultiTaskSSF(backbone, sigma=0.2)
    model.add_task("a", 4)
    assert type(model.backbone.blocks[0].mlp) is FusedGeluMlp
    images = make_images("vit")
    results = {}
    for fast in (False, True):
        model.set_fast_path(fast)
        with torch.no_grad():
            results[f"{fast} no grad"] = model(images, "a")
        model.zero_grad(set_to_none=True)
        model.train()
        model(images, "a")[:, :4].square().sum().backward()
        results[f"{fast} grad"] = model.backbone.blocks[0].mlp.fc1.ssf_scale.grad.clone()
    assert_close(results["True no grad"], results["False no grad"], rtol=1e-5, atol=1e-5)
    assert_close(results["True grad"], results["False grad"], rtol=1e-4, atol=1e-6)
