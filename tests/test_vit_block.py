"""The residual stream's fused training path: the Triton kernel (in the interpreter), its torch version, the chain."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn
from torch.nn import functional as F
from torch.testing import assert_close

from conftest import make_backbone, make_images, run_in_triton_interpreter
from ssf_tasks import MultiTaskSSF
from ssf_tasks.adapters.vit_block import FusedBlockChain
from ssf_tasks.kernels import residual_norm
from ssf_tasks.kernels.frozen_op import FrozenOpSSF

KERNEL_CHECK = """
import json
import torch
from ssf_tasks.kernels import residual_norm as kernel

torch.manual_seed(0)
errors = {}


def relative(a, b):
    # the largest error against the largest value, row by row (a large row of sums must not hide a small one)
    a, b = a.double().reshape(-1, b.shape[-1]), b.reshape(-1, b.shape[-1])
    return float(((a - b).abs().amax(-1) / b.abs().amax(-1)).max())


shapes = [(3, 70, 200), (2, 197, 64), (1000, 130), (5, 33)]  # rows and channels that fill no whole block
default = (kernel._BLOCK_R, kernel._WARPS, kernel._PROGRAMS_PER_SM)
tiles = [default, (2, 4, 3), (8, 2, 1000)]  # the submitted tile; few chunks of many rows; one row block a chunk
for block_r, warps, programs in tiles:
    kernel._BLOCK_R, kernel._WARPS, kernel._PROGRAMS_PER_SM = block_r, warps, programs
    for shape in shapes:
        channels = shape[-1]
        d_h, d_out, x_in = torch.randn(*shape), torch.randn(*shape), 3 + torch.randn(*shape)
        x_out = x_in + torch.randn(*shape)
        _, mean, rstd = torch.ops.aten.native_layer_norm(x_out.double(), [channels], None, None, 1e-6)
        # w, b, γ_n; γ_l, β_l; the next op's γ_l
        vectors = [1 + 0.3 * torch.randn(channels), torch.randn(channels), 1 + 0.3 * torch.randn(channels)]
        vectors += [1 + 0.3 * torch.randn(channels), torch.randn(channels), 1 + 0.3 * torch.randn(channels)]
        w, b, norm_scale, lin_scale, lin_shift, next_scale = [v.double() for v in vectors]
        folded = w * norm_scale
        wide = [t.double() for t in (d_h, d_out, x_out, x_in, mean, rstd)]
        stats = [t.float().flatten() for t in (mean, rstd)]

        def expected(sums, has_next=True):
            return kernel._gradients_from_sums(sums, w, b, lin_scale, lin_shift, next_scale if has_next else None)

        # fp32 throughout: dy holds dx's values, in a tensor of its own
        want_dx, _, sums = kernel._residual_norm_backward_torch(*wide, folded, torch.float64)
        dx, dy, grads = kernel._residual_norm_backward_op(
            d_h, d_out, x_out, x_in, *stats, *vectors, torch.float32
        )
        errors[f"{block_r}/{shape}/fp32 dy copy"] = float((dy - dx).abs().max()) + (dy.data_ptr() == dx.data_ptr())
        for name, a, b_ in (("dx", dx, want_dx), ("grads", grads, expected(sums))):
            errors[f"{block_r}/{shape}/fp32 {name}"] = relative(a, b_)
        # without x_in (never read): the fourth sum is Σ dx ⊙ x_out; without the next op, the fifth row is zeros
        _, _, sums = kernel._residual_norm_backward_torch(*wide[:3], None, *wide[4:], folded, torch.float64)
        _, _, grads = kernel._residual_norm_backward_op(
            d_h, d_out, x_out, None, *stats, *vectors[:5], None, torch.float32
        )
        errors[f"{block_r}/{shape}/fp32 without x_in grads"] = relative(grads[:4], expected(sums)[:4])
        errors[f"{block_r}/{shape}/fp32 without next zeros"] = float(grads[4].abs().max())
        # as under bf16 autocast: the norm's output gradient in bf16, the stream in fp32, dy in bf16
        d_h16 = d_h.bfloat16()
        want_dx, _, sums = kernel._residual_norm_backward_torch(d_h16.double(), *wide[1:], folded, torch.float64)
        dx, dy, grads = kernel._residual_norm_backward_op(
            d_h16, d_out, x_out, x_in, *stats, *vectors, torch.bfloat16
        )
        errors[f"{block_r}/{shape}/mixed dy dtype"] = float(dy.dtype == torch.bfloat16)
        # dy is dx rounded to bf16: within one bf16 step of dx (the interpreter rounds towards zero)
        steps = (dy.float() - dx).abs() / (dx.abs() * 2**-7).clamp_min(1e-30)
        errors[f"{block_r}/{shape}/mixed dy is dx rounded"] = float(steps.max())
        for name, a, b_ in (("dx", dx, want_dx), ("grads", grads, expected(sums))):
            errors[f"{block_r}/{shape}/mixed {name}"] = relative(a, b_)
print(json.dumps(errors))
"""


def test_kernel_matches_the_torch_version_in_the_interpreter():
    pytest.importorskip("triton")
    errors = run_in_triton_interpreter(KERNEL_CHECK)
    assert len(errors) == 3 * 4 * 9
    assert all(v == 0 for k, v in errors.items() if k.endswith(("dy copy", "zeros"))), errors
    assert all(v == 1 for k, v in errors.items() if k.endswith("dy dtype")), errors
    assert all(v <= 1 for k, v in errors.items() if k.endswith("is dx rounded")), errors
    numeric = {k: v for k, v in errors.items() if k.endswith((" dx", " grads"))}
    assert len(numeric) == 3 * 4 * 5
    assert all(v < 1e-5 for v in numeric.values()), numeric  # fp32 against fp64, on the same bf16 inputs


def test_torch_version_is_the_residual_add_and_layer_norm_backward_with_its_sums():
    torch.manual_seed(0)
    shape = (2, 9, 12)
    x_in = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    weight = (1 + 0.3 * torch.randn(12, dtype=torch.float64)).requires_grad_(True)
    bias = torch.randn(12, dtype=torch.float64, requires_grad=True)
    d_h, d_out = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    x_out = x_in + y
    h = F.layer_norm(x_out, (12,), weight, bias, 1e-5)
    torch.autograd.backward([h, x_out], [d_h, d_out])
    _, mean, rstd = torch.ops.aten.native_layer_norm(x_out.detach(), [12], None, None, 1e-5)
    kept = (x_out.detach(), x_in.detach(), mean, rstd, weight.detach())
    dx, dy, sums = residual_norm._residual_norm_backward_torch(d_h, d_out, *kept, y.dtype)
    assert_close(dx, x_in.grad)
    assert dy.data_ptr() != dx.data_ptr()  # never an alias: see _ResidualSSF.backward
    assert_close(y.grad, dy)
    assert_close(sums[0], weight.grad)  # Σ d_h ⊙ x̂
    assert_close(sums[1], bias.grad)  # Σ d_h
    assert_close(sums[2], y.grad.sum((0, 1)))
    assert_close(sums[3], (y.grad * y.detach()).sum((0, 1)))
    assert_close(sums[4], (d_out * x_out.detach()).sum((0, 1)))
    # Without x_in the fourth sum is Σ dx ⊙ x_out; the op before gives the Σ dx ⊙ x_in that it lacks.
    _, _, partial = residual_norm._residual_norm_backward_torch(d_h, d_out, x_out.detach(), None, *kept[2:], y.dtype)
    assert_close(partial[[0, 1, 2, 4]], sums[[0, 1, 2, 4]])
    assert_close(partial[3] - (y.grad * x_in.detach()).sum((0, 1)), sums[3])


def test_backward_gives_the_gradients_of_both_sites():
    """``residual_norm_backward``'s five rows against autograd through the Linear site's SSF (``z ⊙ γ_l + β_l``),
    the residual add and the LayerNorm site's folded affine."""
    torch.manual_seed(0)
    shape, channels = (2, 9, 12), 12

    def vector(centre):
        return (centre + 0.3 * torch.randn(channels, dtype=torch.float64)).requires_grad_(True)

    x_in = torch.randn(shape, dtype=torch.float64)
    z = torch.randn(shape, dtype=torch.float64)  # the Linear's output before its SSF
    weight, bias, norm_scale, norm_shift, lin_scale, lin_shift = [vector(c) for c in (1, 0, 1, 0, 1, 0)]
    next_scale = vector(1).detach()
    y = z * lin_scale + lin_shift
    x_out = x_in + y
    h = F.layer_norm(x_out, (channels,), weight * norm_scale, bias * norm_scale + norm_shift, 1e-5)
    d_h, d_out = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    torch.autograd.backward([h, x_out], [d_h, d_out])
    _, mean, rstd = torch.ops.aten.native_layer_norm(x_out.detach(), [channels], None, None, 1e-5)
    norm_affine = tuple(v.detach() for v in (weight, bias, norm_scale))
    lin_affine = (lin_scale.detach(), lin_shift.detach())
    stream = (d_h, d_out, x_out.detach())
    dx, dy, grads = residual_norm.residual_norm_backward(
        *stream, x_in, mean, rstd, norm_affine, lin_affine, next_scale, torch.float64
    )
    assert_close(grads[0], norm_scale.grad)
    assert_close(grads[1], norm_shift.grad)
    assert_close(grads[2], lin_scale.grad)
    assert_close(grads[3], lin_shift.grad)
    assert_close(grads[4], -(d_out * x_out.detach()).sum((0, 1)) / next_scale)  # the next op's share
    # Without x_in, dγ_l lacks -Σ dx ⊙ x_in / γ_l (the op before gives it); without the next op, no share.
    _, _, alone = residual_norm.residual_norm_backward(
        *stream, None, mean, rstd, norm_affine, lin_affine, None, y.dtype
    )
    assert_close(alone[[0, 1, 3]], grads[[0, 1, 3]])
    assert_close(alone[2] - (dy * x_in).sum((0, 1)) / lin_scale.detach(), grads[2])
    assert torch.equal(alone[4], torch.zeros(channels, dtype=torch.float64))
    with pytest.raises(ValueError, match="stream tensors of one shape"):
        residual_norm.residual_norm_backward(
            d_h, d_out[:1], x_out.detach(), x_in, mean, rstd, norm_affine, lin_affine, None, y.dtype
        )
    with pytest.raises(ValueError, match="statistic per row"):
        residual_norm.residual_norm_backward(*stream, x_in, mean[:1], rstd, norm_affine, lin_affine, None, y.dtype)
    with pytest.raises(ValueError, match="per-channel vectors"):
        residual_norm.residual_norm_backward(
            *stream, x_in, mean, rstd, norm_affine, lin_affine, next_scale[:3], y.dtype
        )


def test_vit_blocks_take_the_chain_class_and_the_fold_gives_timm_back():
    model = MultiTaskSSF(timm.create_model("test_vit", num_classes=0))
    model.add_task("a", 3)
    assert type(model.backbone.blocks) is FusedBlockChain
    folded = model.fold("a")
    assert type(folded.blocks) is nn.Sequential


@pytest.mark.parametrize("option", [{"init_values": 1e-5}, {"drop_path_rate": 0.1}])
def test_blocks_with_layer_scale_or_stochastic_depth_keep_timm_class(option):
    """The chain adds each branch to the stream as it is: a layer scale or a dropped path would be skipped."""
    model = MultiTaskSSF(timm.create_model("test_vit", num_classes=0, **option))
    assert type(model.backbone.blocks) is nn.Sequential


def _count_calls(monkeypatch):
    calls = {"norm": 0, "kept": [], "reads_x_in": []}
    original_backward = residual_norm.residual_norm_backward
    original_apply = FrozenOpSSF.apply

    def backward(*args):
        calls["norm"] += 1
        calls["reads_x_in"].append(args[3] is not None)
        return original_backward(*args)

    def apply(*args):
        calls["kept"].append(args[6])  # what the Linear/Conv op saves for backward
        return original_apply(*args)

    monkeypatch.setattr(residual_norm, "residual_norm_backward", backward)
    monkeypatch.setattr(FrozenOpSSF, "apply", apply)
    return calls


def test_chain_runs_one_norm_op_per_layer_norm_site_after_a_linear(monkeypatch):
    """On the fast path every LayerNorm but the first runs the fused op, and ``proj``/``fc2`` keep nothing: their
    sums come out of the next norm's backward (the values are checked against the eager path in
    test_model.test_fast_path_matches_eager_outputs_and_gradients)."""
    calls = _count_calls(monkeypatch)
    model = MultiTaskSSF(make_backbone("vit"))
    model.add_task("a", 4)
    model.set_fast_path(True)
    model.train()
    model(make_images("vit"), "a")[:, :4].sum().backward()
    depth = len(model.backbone.blocks)
    assert calls["norm"] == 2 * depth - 1
    # only the first op reads its stream input; every later one gets Σ dx ⊙ x_in from the op before
    assert sorted(calls["reads_x_in"]) == [False] * (2 * depth - 2) + [True]
    # per block: qkv keeps its output (attention keeps it), proj and fc2 keep nothing, fc1 its output; the stem
    assert sorted(calls["kept"]) == sorted(["output"] + ["output", "nothing", "output", "nothing"] * depth)


def test_chain_is_left_for_mixed_batches_and_active_dropout(monkeypatch):
    calls = _count_calls(monkeypatch)
    model = MultiTaskSSF(make_backbone("vit"), sigma=0.2)
    model.add_tasks({"a": 4, "b": 2})
    model.set_fast_path(True)
    model.train()
    images = make_images("vit")
    model(images, ["a", "b", "a"]).nan_to_num(neginf=0).sum().backward()
    assert calls["norm"] == 0
    model.zero_grad(set_to_none=True)
    # dropout after proj, active in training: the chain would skip it, so timm's blocks run (MultiTaskSSF keeps
    # the backbone in eval mode, so this takes a backbone put in training mode by hand)
    model.backbone.blocks[0].attn.proj_drop.p = 0.5
    model.backbone.blocks.train()
    model(images, "a")[:, :4].sum().backward()
    assert calls["norm"] == 0
    model.backbone.blocks.eval()  # dropout off: the chain again
    with torch.no_grad():
        model(images, "a")
    assert calls["norm"] == 0  # forward only: the op's backward never ran
    assert any(kept == "nothing" for kept in calls["kept"])


def test_frozen_op_refuses_an_unknown_keep():
    x, weight, bias, scale = torch.randn(2, 3), torch.randn(4, 3), torch.randn(4), torch.ones(4)
    with pytest.raises(ValueError, match="keep must be"):
        FrozenOpSSF.apply(x, weight, bias, scale, None, "linear", "everything", None, None, None)
    with pytest.raises(ValueError, match="output saved"):
        FrozenOpSSF.apply(x, weight, bias, scale, None, "linear", "nothing", None, "gelu", None)
    with pytest.raises(ValueError, match="output saved"):
        FrozenOpSSF.apply(x, weight, bias, scale, None, "linear", "input", None, None, 2)


def test_chain_under_bf16_autocast_matches_the_eager_path():
    """Under autocast the fused norm op hands its output to the next Linear in bf16 (no cast pass); the
    gradients stay those of the eager path, within bf16 rounding."""
    grads = {}
    for fast in (False, True):
        model = MultiTaskSSF(make_backbone("vit"), sigma=0.2)
        model.add_task("a", 4)
        model.set_fast_path(fast)
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(make_images("vit"), "a")[:, :4]
        logits.float().logsumexp(-1).sum().backward()
        grads[fast] = {n: s.ssf_scale.grad.float() for n, s in model.named_sites()}
    for name, eager in grads[False].items():
        assert_close(grads[True][name], eager, rtol=0.05, atol=0.05 * eager.abs().max().item(), msg=name)


def test_chain_gradients_with_trained_layer_norm_affines_match_the_eager_path():
    """LayerNorms with weights and biases away from 1 and 0 (as in a pretrained backbone): the norm sites'
    ``dγ = w ⊙ Σ d_h ⊙ x̂ + b ⊙ Σ d_h`` needs both terms, which a fresh model's w = 1, b = 0 would hide."""
    results = {}
    for fast in (False, True):
        backbone = make_backbone("vit")
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for module in backbone.modules():
                if isinstance(module, nn.LayerNorm):
                    module.weight.copy_(1 + 0.5 * torch.randn(module.weight.shape, generator=generator))
                    module.bias.copy_(0.5 * torch.randn(module.bias.shape, generator=generator))
        model = MultiTaskSSF(backbone, sigma=0.2)
        model.add_task("a", 4)
        model.set_fast_path(fast)
        model.train()
        model(make_images("vit"), "a")[:, :4].logsumexp(-1).sum().backward()
        results[fast] = {
            f"{name}.{kind}": getattr(site, kind).grad.clone()
            for name, site in model.named_sites()
            for kind in ("ssf_scale", "ssf_shift")
            if getattr(site, kind) is not None
        }
    assert any("norm2" in key for key in results[True])
    for key, eager in results[False].items():
        assert_close(results[True][key], eager, rtol=1e-4, atol=1e-6, msg=key)
