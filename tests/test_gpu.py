"""Checks that need a CUDA device (skipped on CPU CI; run on the GPU machine with `pytest -m gpu`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from torch.testing import assert_close

from ssf_tasks import MultiTaskSSF

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _model(name: str = "vit_small_patch16_224") -> MultiTaskSSF:
    torch.manual_seed(0)
    model = MultiTaskSSF(timm.create_model(name, num_classes=0).cuda().eval(), sigma=0.1)
    model.add_tasks({f"t{i}": 5 + i for i in range(8)})
    return model


def test_fast_path_is_used_on_cuda_and_matches_eager_gradients():
    model = _model()
    images = torch.randn(4, 3, 224, 224, device="cuda")
    grads = {}
    for fast in (None, False):  # None: the automatic choice, which must be the fused path on CUDA
        model.set_fast_path(fast)
        model.zero_grad(set_to_none=True)
        model.train()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(images, "t3")[:, :8]
        logits.float().logsumexp(-1).sum().backward()
        grads[fast] = {n: s.ssf_scale.grad[3].float().clone() for n, s in model.named_sites()}
    assert model.sites[0]._fast_kind == "conv2d" and model.sites[1]._fast_kind == "layer_norm"
    for name in grads[False]:
        assert_close(
            grads[None][name], grads[False][name], rtol=0.05, atol=0.05 * grads[False][name].abs().max().item()
        )


def test_compiled_mixed_batch_matches_eager():
    """The compiled forward with the mixed-batch kernels, in one graph, against eager without them (timm's paths);
    the task rows are a strided view, as a column of a table would be."""
    model = _model().to(torch.bfloat16)
    images = torch.randn(16, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    tasks = torch.randint(0, 8, (16, 2), device="cuda")[:, 1]
    with torch.inference_mode():
        model.set_mixed_attention(False)
        model.set_mixed_gelu(False)
        eager = model(images, tasks)
        model.set_mixed_attention(True)
        model.set_mixed_gelu(True)
        torch._dynamo.reset()
        compiled = torch.compile(model, dynamic=False, fullgraph=True)(images, tasks)
    finite = torch.isfinite(eager)
    assert torch.equal(finite, torch.isfinite(compiled))
    error = (compiled[finite].float() - eager[finite].float()).abs().max() / eager[finite].float().abs().max()
    assert error < 2e-2, error


def test_fold_on_gpu_fp32_is_exact():
    model = _model()
    images = torch.randn(4, 3, 224, 224, device="cuda")
    from ssf_tasks import fold_error

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    assert fold_error(model, "t5", images) <= 1e-5


def test_cli_trains_on_cuda_and_compiled_predict_matches_eager(tmp_path, monkeypatch):
    """The product path on the GPU: `task add --device cuda` (bf16, fused SSF), `predict --compile`, and a mixed
    two-task `predict --precision bf16` (which takes the attention kernel)."""
    pytest.importorskip("sqlalchemy")
    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from ssf_tasks_cli.main import app

    rng = np.random.default_rng(0)
    colours = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}
    for split, count in (("train", 8), ("val", 2), ("test", 4)):
        for name, colour in colours.items():
            folder = tmp_path / "data" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(rng.normal(colour, 40, size=(48, 48, 3)), 0, 255).astype("uint8")
                Image.fromarray(pixels).save(folder / f"{i}.png")
    torch.manual_seed(0)
    save_file(timm.create_model("test_vit").state_dict(), tmp_path / "w.safetensors")
    url = f"sqlite:///{tmp_path / 'registry.db'}"

    def ok(*args):
        result = CliRunner().invoke(app, ["--registry", url, *map(str, args)])
        assert result.exit_code == 0, result.output
        return result

    ok("backbone", "add", "tv", "--model", "test_vit", "--weights", tmp_path / "w.safetensors")
    ok(
        "task",
        "add",
        "colours",
        "--backbone",
        "tv",
        "--data",
        tmp_path / "data",
        "--epochs",
        "3",
        "--batch-size",
        "8",
        "--lr",
        "0.02",
        "--device",
        "cuda",
    )
    manifest = tmp_path / "m.csv"
    images = sorted((tmp_path / "data" / "test").glob("*/*.png"))
    manifest.write_text("path,task\n" + "".join(f"{p},colours\n" for p in images))
    for flag in ("--compile", "--no-compile"):
        ok("predict", manifest, "--out", tmp_path / f"{flag}.csv", "--device", "cuda", "--batch-size", "5", flag)
    import csv

    compiled, eager = (list(csv.DictReader(open(tmp_path / f"{f}.csv"))) for f in ("--compile", "--no-compile"))
    assert [r["label"] for r in compiled] == [r["label"] for r in eager]
    assert_close(
        torch.tensor([float(r["score"]) for r in compiled]),
        torch.tensor([float(r["score"]) for r in eager]),
        atol=2e-3,
        rtol=0,
    )
    correct = sum(r["label"] == Path(r["path"]).parent.name for r in eager)
    assert correct >= 10, correct  # 12 test images of 3 well-separated colours

    # A second task, and a manifest that mixes the two in every batch.
    ok("task", "add", "colours2", "--backbone", "tv", "--data", tmp_path / "data", "--epochs", "1", "--device", "cuda")
    mixed = tmp_path / "mixed.csv"
    mixed.write_text("path,task\n" + "".join(f"{p},{('colours', 'colours2')[i % 2]}\n" for i, p in enumerate(images)))
    from ssf_tasks.adapters import vit_attention

    kernel_calls, kernel = {"fp32": 0, "bf16": 0}, vit_attention.mixed_ssf_attention
    for precision in ("fp32", "bf16"):

        def counted(*args, precision=precision):
            kernel_calls[precision] += 1
            return kernel(*args)

        monkeypatch.setattr(vit_attention, "mixed_ssf_attention", counted)
        args = ("--device", "cuda", "--batch-size", "6", "--no-compile", "--precision", precision)
        ok("predict", mixed, "--out", tmp_path / f"{precision}.csv", *args)
    assert kernel_calls["fp32"] == 0 and kernel_calls["bf16"] > 0, kernel_calls  # the kernel takes half floats only
    fp32, bf16 = (list(csv.DictReader(open(tmp_path / f"{p}.csv"))) for p in ("fp32", "bf16"))
    assert [r["task"] for r in bf16] == [r["task"] for r in fp32] == [("colours", "colours2")[i % 2] for i in range(12)]
    assert_close(
        torch.tensor([float(r["score"]) for r in bf16]),
        torch.tensor([float(r["score"]) for r in fp32]),
        atol=3e-2,
        rtol=0,
    )


@pytest.mark.parametrize(("tokens", "heads", "head_dim"), [(197, 6, 64), (50, 4, 32), (17, 2, 128)])
def test_mixed_attention_kernel_matches_ssf_then_attention(tokens, heads, head_dim):
    from ssf_tasks.kernels.mixed_attention import mixed_ssf_attention, mixed_ssf_attention_reference

    torch.manual_seed(tokens)
    width = 3 * heads * head_dim
    qkv = torch.randn(5, tokens, width, device="cuda", dtype=torch.bfloat16)
    scale = 1 + 0.3 * torch.randn(7, width, device="cuda")
    shift = torch.randn(7, width, device="cuda")  # large shifts: the k shift must cancel, the v shift carry over
    tasks = torch.tensor([6, 0, 3, 3, 1], device="cuda")
    expected = mixed_ssf_attention_reference(qkv.double(), scale.double(), shift.double(), tasks, heads)
    result = mixed_ssf_attention(qkv, scale.to(torch.bfloat16), shift.to(torch.bfloat16), tasks, heads)
    assert result.shape == expected.shape and torch.isfinite(result).all()
    error = (result.double() - expected).norm() / expected.norm()
    assert error < 1e-2, error


def test_attention_kernel_takes_pointer_loads_where_tma_cannot_and_both_are_right():
    from ssf_tasks.kernels.mixed_attention import (
        TensorDescriptor,
        mixed_ssf_attention,
        mixed_ssf_attention_reference,
        tma_available,
    )

    torch.manual_seed(1)
    heads, head_dim, tokens = 4, 32, 50
    width = 3 * heads * head_dim
    storage = torch.randn(3 * tokens * width + 1, device="cuda", dtype=torch.bfloat16)
    aligned, misaligned = storage[:-1].view(3, tokens, width), storage[1:].view(3, tokens, width)
    assert tma_available(aligned) == (TensorDescriptor is not None and torch.cuda.get_device_capability()[0] >= 9)
    assert not tma_available(misaligned)  # its start is 2 bytes past a 16-byte boundary
    scale, shift = 1 + 0.3 * torch.randn(4, width, device="cuda"), torch.randn(4, width, device="cuda")
    tasks = torch.tensor([3, 0, 3], device="cuda")
    for qkv in (aligned, misaligned):
        expected = mixed_ssf_attention_reference(qkv.double(), scale.double(), shift.double(), tasks, heads)
        result = mixed_ssf_attention(qkv, scale.to(torch.bfloat16), shift.to(torch.bfloat16), tasks, heads)
        error = (result.double() - expected).norm() / expected.norm()
        assert error < 1e-2, error


@pytest.mark.parametrize("shape", [(256, 197, 3072), (3, 197, 1536), (5, 50, 200)])
def test_mixed_gelu_kernel_matches_the_reference(shape):
    from ssf_tasks.kernels.mixed_gelu import _mixed_ssf_gelu_op, mixed_ssf_gelu_reference

    torch.manual_seed(0)
    batch, _, channels = shape
    y = (2 * torch.randn(shape, device="cuda")).bfloat16()
    scale = (1 + 0.3 * torch.randn(64, channels, device="cuda")).bfloat16()
    shift = (0.5 * torch.randn(64, channels, device="cuda")).bfloat16()
    tasks = torch.randint(0, 64, (batch,), device="cuda")
    expected = mixed_ssf_gelu_reference(y.double(), scale, shift, tasks)
    result = _mixed_ssf_gelu_op(y, scale, shift, tasks).double()
    # in bf16 rounding steps (2**-8 of the value: one rounding, and GPU erf's last bits), or 1% of the largest
    steps = (result - expected).abs() / (expected.abs() + 0.01 * expected.abs().max()) / 2**-8
    assert steps.max() <= 1.0, steps.max()


@pytest.mark.parametrize("kernel", ["attention", "gelu"])
@pytest.mark.parametrize("autocast", [False, True])
def test_mixed_batch_uses_each_kernel_and_matches_timm(kernel, autocast):
    """Each mixed-batch kernel runs (profiler) and matches timm's module (the kernel turned off): a bf16 model, or
    (``predict --precision bf16``'s setting) an fp32 model under bf16 autocast."""
    model = _model() if autocast else _model().to(torch.bfloat16)
    images = torch.randn(6, 3, 224, 224, device="cuda", dtype=torch.float32 if autocast else torch.bfloat16)
    tasks = torch.tensor([0, 5, 5, 2, 7, 1], device="cuda")
    set_kernel = {"attention": model.set_mixed_attention, "gelu": model.set_mixed_gelu}[kernel]
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
            fused = model(images, tasks)
            torch.cuda.synchronize()
        set_kernel(False)
        reference = model(images, tasks)
    assert any(f"mixed_ssf_{kernel}" in event.name for event in profile.events())
    finite = torch.isfinite(reference)  # a random ViT in bf16 overflows in a few features
    assert torch.equal(finite, torch.isfinite(fused))
    error = (fused[finite].float() - reference[finite].float()).abs().max() / reference[finite].float().abs().max()
    assert error < 2e-2, error


def test_graphed_forward_replays_new_inputs_and_checks_them():
    from ssf_tasks import BatchMismatchError, GraphedForward, TaskNotFoundError

    model = _model().to(torch.bfloat16)
    images = torch.randn(4, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    tasks = torch.tensor([1, 1, 4, 0], device="cuda")
    with torch.inference_mode():
        graphed = GraphedForward(model, images, tasks, validate=lambda _, t: model.check_task_indices(t))
        new_images, new_tasks = torch.randn_like(images), torch.tensor([7, 2, 2, 3], device="cuda")
        assert_close(graphed(new_images, new_tasks).clone(), model(new_images, new_tasks), rtol=0, atol=0)
        with pytest.raises(BatchMismatchError, match="captured for inputs of shape"):
            graphed(images[:2], tasks[:2])
        with pytest.raises(TaskNotFoundError, match="task index 8 is out of range for 8 tasks"):
            graphed(images, torch.tensor([0, 8, 1, 1], device="cuda"))


def test_compiled_fused_training_matches_eager_gradients():
    """The fused path under torch.compile against the eager path, in fp32 (ViT's blocks run as the chain)."""
    model = _model()
    assert type(model.backbone.blocks).__name__ == "FusedBlockChain"
    images = torch.randn(4, 3, 224, 224, device="cuda")
    grads = {}
    for fast, compiled in ((False, False), (None, True)):
        model.set_fast_path(fast)
        model.zero_grad(set_to_none=True)
        model.train()
        torch._dynamo.reset()
        forward = torch.compile(model, dynamic=False) if compiled else model
        forward(images, "t3")[:, :8].logsumexp(-1).sum().backward()
        grads[compiled] = {
            f"{name}.{kind}": getattr(site, kind).grad[3].clone()
            for name, site in model.named_sites()
            for kind in ("ssf_scale", "ssf_shift")
            if getattr(site, kind) is not None
        }
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) > 70
    for key, eager in grads[False].items():
        assert_close(grads[True][key], eager, rtol=1e-3, atol=1e-3 * eager.abs().max().item(), msg=key)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gelu_backward_sums_kernel_matches_fp64(dtype):
    """The fused fc1 backward kernel at ViT-B's training shape (and a ragged one) against fp64."""
    from ssf_tasks.kernels import gelu_backward
    from ssf_tasks.kernels.gelu_backward import _gelu_backward_sums_torch

    assert gelu_backward.triton is not None, "the kernel is not available (Triton or torch.library.triton_op missing)"
    torch.manual_seed(0)
    for shape in [(64, 197, 3072), (3, 70, 200)]:
        dout = torch.randn(shape, device="cuda").to(dtype)
        y = (2 * torch.randn(shape, device="cuda")).to(dtype)
        dy, sum_dy, sum_dy_y = gelu_backward._gelu_backward_sums_op(dout, y)
        expected = _gelu_backward_sums_torch(dout.double(), y.double())
        tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5  # bf16: the rounding of dy itself
        for got, want in zip((dy, sum_dy, sum_dy_y), expected, strict=True):
            assert (got.double() - want).abs().max() <= tolerance * want.abs().max()
        if dtype == torch.bfloat16:  # the sums are those of dy as rounded, as the eager path takes them
            assert_close(sum_dy, dy.float().sum((0, 1)), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("stream_dtype", [torch.float32, torch.bfloat16])
def test_residual_norm_backward_kernel_matches_fp64(stream_dtype):
    """The residual stream's backward kernel at ViT-B's training shape (and a ragged one) against fp64: the
    norm's output gradient in bf16, the stream in fp32 (bf16 autocast) or bf16 (a bf16 model)."""
    from ssf_tasks.kernels import residual_norm

    assert residual_norm.triton is not None, "the kernel is not available (Triton or torch.library.triton_op missing)"
    torch.manual_seed(0)
    for shape in [(64, 197, 768), (3, 70, 200)]:
        d_h = torch.randn(shape, device="cuda").bfloat16()
        d_out = torch.randn(shape, device="cuda").to(stream_dtype)
        x_in = (3 + torch.randn(shape, device="cuda")).to(stream_dtype)
        x_out = (x_in.float() + torch.randn(shape, device="cuda").bfloat16().float()).to(stream_dtype)
        vectors = [c + 0.3 * torch.randn(shape[-1], device="cuda") for c in (1, 0, 1, 1, 0, 1)]
        norm_affine, lin_affine, next_scale = vectors[:3], vectors[3:5], vectors[5]
        _, mean, rstd = torch.ops.aten.native_layer_norm(x_out.float(), [shape[-1]], None, None, 1e-6)
        kept = (x_out, x_in, mean, rstd)
        dx, dy, grads = residual_norm.residual_norm_backward(
            d_h, d_out, *kept, norm_affine, lin_affine, next_scale, torch.bfloat16
        )
        wide = [t.double() for t in (d_h, d_out, *kept)]
        w, b, norm_scale, lin_scale, lin_shift, next_wide = [v.double() for v in vectors]
        want_dx, _, sums = residual_norm._residual_norm_backward_torch(*wide, w * norm_scale, torch.float64)
        expected = residual_norm._gradients_from_sums(sums, w, b, lin_scale, lin_shift, next_wide)
        assert dy.dtype == torch.bfloat16 and dx.dtype == stream_dtype
        tolerance = 1e-5 if stream_dtype == torch.float32 else 1e-2  # bf16: the rounding of dx itself
        for got, want in ((dx, want_dx), (dy, want_dx), *zip(grads, expected, strict=True)):
            assert (got.double() - want).abs().max() <= max(tolerance, 1e-2 * (got is dy)) * want.abs().max()
        # without x_in (never read), as every op of the chain but the first runs it; and without a next op
        _, _, grads = residual_norm.residual_norm_backward(
            d_h, d_out, x_out, None, *kept[2:], norm_affine, lin_affine, None, torch.bfloat16
        )
        _, _, sums = residual_norm._residual_norm_backward_torch(
            *wide[:3], None, *wide[4:], w * norm_scale, torch.float64
        )
        expected = residual_norm._gradients_from_sums(sums, w, b, lin_scale, lin_shift, None)
        for got, want in zip(grads[:4], expected[:4], strict=True):
            assert (got.double() - want).abs().max() <= tolerance * want.abs().max()
        assert not grads[4].any()


def test_qkv_backward_kernel_matches_fp64_on_sdpa_gradients():
    """The qkv backward kernel at ViT-B's training shape (and a ragged one), fed the q/k/v gradients SDPA's
    backward gives (their strides as SDPA makes them), against fp64."""
    from ssf_tasks.kernels import qkv_backward as qkv_kernel

    assert qkv_kernel.triton is not None, "the kernel is not available (Triton or torch.library.triton_op missing)"
    torch.manual_seed(0)
    for batch, tokens, heads, head_dim in [(64, 197, 12, 64), (3, 70, 2, 32)]:
        y = torch.randn(batch, tokens, 3 * heads * head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        q, k, v = y.reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        scale = 1 + 0.3 * torch.randn(y.shape[-1], device="cuda")
        shift = torch.randn(y.shape[-1], device="cuda")
        dy, site_grads = qkv_kernel.qkv_backward(*grads, y.detach(), scale, shift)
        dy_expected, sums = qkv_kernel._qkv_backward_sums_torch(*[g.double() for g in grads], y.detach().double())
        expected = qkv_kernel._gradients_from_sums(sums, scale.double(), shift.double())
        assert dy.dtype == torch.bfloat16 and torch.equal(dy.double(), dy_expected)  # a copy: exact
        for got, want in zip(site_grads.double(), expected, strict=True):  # dγ, dβ: each against its own scale
            assert (got - want).abs().max() <= 1e-4 * want.abs().max()
