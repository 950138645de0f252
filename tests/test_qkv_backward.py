"""The fused training path's one-op qkv: the Triton kernel (in the interpreter), its torch version, the op."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from conftest import make_backbone, make_images, run_in_triton_interpreter
from ssf_tasks import MultiTaskSSF
from ssf_tasks.adapters.vit_attention import MixedTaskAttention
from ssf_tasks.kernels.qkv_backward import qkv_backward

KERNEL_CHECK = """
import json
import torch
from ssf_tasks.kernels import qkv_backward as qkv_kernel

torch.manual_seed(0)
errors = {}


def relative(grads, expected):
    # per row (dγ, dβ): the largest error against that row's largest value
    return float(((grads.double() - expected).abs().amax(-1) / expected.abs().amax(-1)).max())


default = (qkv_kernel._BLOCK_R, qkv_kernel._BLOCK_C, qkv_kernel._PROGRAMS_PER_SM)
# the submitted tile; few chunks of many rows with column blocks that cut heads; one row block a chunk
tiles = [default, (2, 16, 3), (16, 64, 1000)]
# (samples, tokens, heads, head size): rows and widths that fill no whole block
shapes = [(3, 70, 2, 16), (2, 13, 3, 8), (1, 5, 1, 64)]
for block_r, block_c, programs in tiles:
    qkv_kernel._BLOCK_R, qkv_kernel._BLOCK_C, qkv_kernel._PROGRAMS_PER_SM = block_r, block_c, programs
    for batch, tokens, heads, head_dim in shapes:
        name = f"{block_r}x{block_c}/{batch}x{tokens}x{heads}x{head_dim}"
        y = torch.randn(batch, tokens, 3 * heads * head_dim)
        # three layouts an attention backward may give: [B, H, N, d], [B, N, H, d] and d not innermost
        dq = torch.randn(batch, heads, tokens, head_dim)
        dk = torch.randn(batch, tokens, heads, head_dim).transpose(1, 2)
        dv = torch.randn(batch, heads, head_dim, tokens).transpose(2, 3)
        scale, shift = 1 + 0.3 * torch.randn(y.shape[-1]), torch.randn(y.shape[-1])
        wide = [t.double() for t in (scale, shift)]
        dy_expected, sums = qkv_kernel._qkv_backward_sums_torch(dq.double(), dk.double(), dv.double(), y.double())
        dy, grads = qkv_kernel._qkv_backward_op(dq, dk, dv, y, scale, shift)
        errors[f"{name}/fp32 dy"] = float((dy.double() - dy_expected).abs().max())  # a copy: exact
        errors[f"{name}/fp32 grads"] = relative(grads, qkv_kernel._gradients_from_sums(sums, *wide))
        # scale only (no β): dγ = Σ dy ⊙ y / γ
        _, grads = qkv_kernel._qkv_backward_op(dq, dk, dv, y, scale, None)
        errors[f"{name}/fp32 scale-only grads"] = relative(grads, qkv_kernel._gradients_from_sums(sums, wide[0], None))
        # bf16 gradients (as SDPA gives them under autocast): dy is exact, the sums are those of the bf16 dy
        low = [g.bfloat16() for g in (dq, dk, dv)]
        dy_expected, sums = qkv_kernel._qkv_backward_sums_torch(*[g.double() for g in low], y.bfloat16().double())
        dy, grads = qkv_kernel._qkv_backward_op(*low, y.bfloat16(), scale, shift)
        errors[f"{name}/bf16 dy"] = float((dy.double() - dy_expected).abs().max()) + (dy.dtype != torch.bfloat16)
        errors[f"{name}/bf16 grads"] = relative(grads, qkv_kernel._gradients_from_sums(sums, *wide))
print(json.dumps(errors))
"""


def test_kernel_matches_the_torch_version_in_the_interpreter():
    pytest.importorskip("triton")
    errors = run_in_triton_interpreter(KERNEL_CHECK)
    assert len(errors) == 3 * 3 * 5
    copies = {k: v for k, v in errors.items() if k.endswith(" dy")}
    assert all(v == 0 for v in copies.values()), copies
    grads = {k: v for k, v in errors.items() if k.endswith(" grads")}
    assert len(grads) == 3 * 3 * 3
    assert all(v < 1e-5 for v in grads.values()), grads  # fp32 accumulation against fp64, on the same inputs


def test_torch_version_lays_out_dq_dk_dv_as_timm_splits_qkv():
    """Autograd through timm's own split (reshape, permute, unbind) of ``z ⊙ γ + β`` gives the layout the kernel must
    write and the site's gradients."""
    batch, tokens, heads, head_dim = 2, 5, 3, 4
    width = 3 * heads * head_dim
    z = torch.randn(batch, tokens, width, dtype=torch.float64)
    scale = (1 + 0.3 * torch.randn(width, dtype=torch.float64)).requires_grad_(True)
    shift = torch.randn(width, dtype=torch.float64, requires_grad=True)
    y = (z * scale + shift).detach().requires_grad_(True)
    q, k, v = y.reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    grads = [torch.randn_like(q) for _ in range(3)]
    torch.autograd.backward([q, k, v], grads)
    (z * scale + shift).backward(y.grad)
    dy, site_grads = qkv_backward(*grads, y.detach(), scale.detach(), shift.detach())
    assert_close(dy, y.grad)
    assert_close(site_grads[0], scale.grad)
    assert_close(site_grads[1], shift.grad)
    _, scale_only = qkv_backward(*grads, y.detach(), scale.detach(), None)
    assert_close(scale_only[0], (y.grad * y.detach()).sum((0, 1)) / scale.detach())
    with pytest.raises(ValueError, match="q/k/v gradients of shape"):
        qkv_backward(grads[0], grads[1], grads[2][:, :2], y.detach(), scale, shift)
    with pytest.raises(ValueError, match="γ and β of shape"):
        qkv_backward(*grads, y.detach(), scale[:3], shift)


@pytest.mark.parametrize("fast", [True, False])
def test_qkv_runs_as_one_op_on_the_fast_path_only(fast, monkeypatch):
    """Each attention's qkv takes the one op on the fused path (inside ViT's block chain), never on the eager path."""
    calls = []
    monkeypatch.setattr("ssf_tasks.kernels.frozen_op.qkv_backward", lambda *a: calls.append(1) or qkv_backward(*a))
    model = MultiTaskSSF(make_backbone("vit"))
    model.add_task("a", 4)
    model.set_fast_path(fast)
    model.train()
    model(make_images("vit"), "a").sum().backward()
    assert len(calls) == (len(model.backbone.blocks) if fast else 0)


def test_one_op_qkv_matches_timm_split_outside_the_chain(monkeypatch):
    """Without the block chain (here: its class taken back), the adopted attention runs the one op itself, with
    the same outputs and gradients as the eager path; ``fused_qkv = False`` takes it off."""
    from ssf_tasks.adapters import restore_timm_classes
    from ssf_tasks.adapters.vit_block import FusedBlockChain

    results = {}
    calls = []
    monkeypatch.setattr("ssf_tasks.kernels.frozen_op.qkv_backward", lambda *a: calls.append(1) or qkv_backward(*a))
    for label, fast, one_op in (("eager", False, True), ("one op", True, True), ("split", True, False)):
        torch.manual_seed(0)
        model = MultiTaskSSF(make_backbone("vit"), sigma=0.2)  # γ/β drawn away from 1 and 0
        restore_timm_classes(model.backbone, (FusedBlockChain,))
        model.add_task("a", 4)
        model.set_fast_path(fast)
        for module in model.backbone.modules():
            if isinstance(module, MixedTaskAttention):
                module.fused_qkv = one_op
        calls.clear()
        model.train()
        out = model(make_images("vit"), "a")
        out.square().sum().backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        results[label] = (out, grads, len(calls))
    assert results["one op"][2] == len(model.backbone.blocks) and results["split"][2] == 0
    for label in ("one op", "split"):
        assert_close(results[label][0], results["eager"][0], rtol=1e-5, atol=1e-5)
        for got, want in zip(results[label][1], results["eager"][1], strict=True):
            assert_close(got, want, rtol=1e-4, atol=1e-6)
