"""Checks that need a CUDA device (skipped on CPU CI; run on the GPU machine with `pytest -m gpu`)."""

from __future__ import annotations

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
    model = _model().to(torch.bfloat16)
    images = torch.randn(16, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    tasks = torch.randint(0, 8, (16,), device="cuda")
    with torch.inference_mode():
        eager = model(images, tasks)
        torch._dynamo.reset()
        compiled = torch.compile(model, dynamic=False)(images, tasks)
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
