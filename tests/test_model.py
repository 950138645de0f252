"""MultiTaskSSF across model families: identity at γ=1/β=0, mixed batches, isolation of tasks, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import assert_close

from conftest import FAMILIES, make_backbone, make_images
from ssf_tasks import (
    BackboneError,
    BatchMismatchError,
    DuplicateTaskError,
    MultiTaskSSF,
    NoSitesError,
    StateDictMismatchError,
    TaskNotFoundError,
)
from ssf_tasks.kernels.frozen_op import patchify_linear


def _model_with_tasks(family: str, sigma: float = 0.1) -> MultiTaskSSF:
    model = MultiTaskSSF(make_backbone(family), sigma=sigma)
    generator = torch.Generator().manual_seed(0)
    model.add_task("a", 5, generator=generator)
    model.add_task("b", 3, generator=generator)
    model.add_task("c", 7, generator=generator)
    return model


def _snapshot(model: MultiTaskSSF) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.backbone_state_dict().items()}


def _assert_bit_identical(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_scale_shift_gives_backbone_output(family):
    backbone = make_backbone(family)
    reference_model = copy.deepcopy(backbone)
    images = make_images(family)
    with torch.no_grad():
        expected = reference_model.forward_head(reference_model.forward_features(images), pre_logits=True)
    model = MultiTaskSSF(backbone)
    model.add_task("t", 4)
    with torch.no_grad():
        for site in model.sites:
            site.ssf_scale.fill_(1.0)
            if site.ssf_shift is not None:
                site.ssf_shift.zero_()
        features = model.forward_features(images, "t")
    assert torch.equal(features, expected)
    # The original weights are still there under timm's keys, untouched.
    _assert_bit_identical(reference_model.state_dict(), model.backbone_state_dict())


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_equals_each_sample_alone(family):
    model = _model_with_tasks(family)
    images = make_images(family, batch=4)
    tasks = ["c", "a", "b", "a"]
    with torch.no_grad():
        mixed = model(images, tasks)
        alone = torch.cat([model(images[i : i + 1], [t]) for i, t in enumerate(tasks)])
        by_index = model(images, torch.tensor([model.task_index(t) for t in tasks], device=images.device))
    assert mixed.shape == (4, 7)
    assert_close(mixed, alone, rtol=1e-5, atol=1e-5)
    assert_close(by_index, mixed, rtol=0, atol=0)
    # -inf exactly past each sample's own class count, finite before it.
    for row, task in zip(mixed, tasks, strict=True):
        k = model.num_classes(task)
        assert torch.isfinite(row[:k]).all() and torch.isneginf(row[k:]).all()
    # Tasks really differ: the same image under two tasks gives different features.
    with torch.no_grad():
        assert not torch.allclose(model.forward_features(images, "a"), model.forward_features(images, "b"))


@pytest.mark.parametrize("family", ["vit", "swin", "resnet", "efficientnet"])
def test_adding_and_removing_tasks_leaves_other_tasks_bit_identical(family):
    model = _model_with_tasks(family)
    images = make_images(family)
    before = _snapshot(model)
    with torch.no_grad():
        out_a = model(images, "a")[:, :5]
        out_b = model(images, ["b", "b", "a"])
        model.add_task("wide", 11)  # grows the padded head width too
        assert torch.equal(model(images, "a")[:, :5], out_a)
        assert torch.equal(model(images, ["b", "b", "a"])[:, :7], out_b)
        model.remove_task("c")
        assert model.task_names == ["a", "b", "wide"]
        assert torch.equal(model(images, "a")[:, :5], out_a)
    _assert_bit_identical(before, model.backbone_state_dict())


@pytest.mark.parametrize("family", ["vit", "convnext", "efficientnet", "swin"])
def test_gradients_reach_only_the_trained_task(family):
    model = _model_with_tasks(family)
    images = make_images(family)
    model.train()
    logits = model(images, "b")
    logits[:, :3].logsumexp(-1).sum().backward()
    row = model.task_index("b")
    others = [i for i in range(3) if i != row]
    for site in model.sites:
        assert site.ssf_scale.grad[row].abs().sum() > 0
        assert site.ssf_scale.grad[others].abs().sum() == 0
    assert model.head_weight.grad[row].abs().sum() > 0
    assert model.head_weight.grad[others].abs().sum() == 0
    for name, param in model.backbone.named_parameters():
        if "ssf_" not in name:
            assert param.grad is None and not param.requires_grad, name


@pytest.mark.parametrize("family", ["vit", "resnet", "efficientnet", "swin"])
def test_training_isolated_tasks_changes_only_them(family):
    model = _model_with_tasks(family)
    images = make_images(family, batch=4)
    before_backbone = _snapshot(model)
    with torch.no_grad():
        before_c = model(images, "c")
    state_a = model.task_state_dict("a")
    state_b = model.task_state_dict("b")
    model.train()
    with model.isolate_tasks(["a", "b"]) as params:
        optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
        labels = torch.tensor([0, 1, 2, 0], device=images.device)
        for _ in range(3):
            logits = model(images, ["a", "b", "a", "b"])  # several tasks in one mixed batch
            loss = torch.nn.functional.cross_entropy(logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(images, "c"), before_c)
    for name, state in (("a", state_a), ("b", state_b)):
        after = model.task_state_dict(name)
        assert any(not torch.equal(after[k], state[k]) for k in state), name
    _assert_bit_identical(before_backbone, model.backbone_state_dict())
    # BatchNorm statistics were not updated by train mode.
    assert not any(m.training for m in model.backbone.modules())


def test_failed_isolated_training_restores_the_model():
    model = _model_with_tasks("vit")
    state = model.task_state_dict("a")
    with pytest.raises(RuntimeError, match="boom"):
        with model.isolate_tasks(["a"]) as params:
            with torch.no_grad():
                for p in params:
                    p.add_(1.0)
            raise RuntimeError("boom")
    assert model.task_names == ["a", "b", "c"]
    after = model.task_state_dict("a")
    assert all(torch.equal(after[k], state[k]) for k in state)


@pytest.mark.parametrize("family", ["vit", "convnext", "efficientnet_gn"])
def test_task_state_dict_round_trip(family):
    model = _model_with_tasks(family)
    images = make_images(family)
    state = model.task_state_dict("b")
    before = _snapshot(model)
    other = MultiTaskSSF(make_backbone(family))
    other.load_task("copy", state)
    with torch.no_grad():
        assert_close(other(images, "copy"), model(images, "b")[:, :3], rtol=0, atol=0)
    with pytest.raises(DuplicateTaskError):
        other.load_task("copy", state)
    other.load_task("copy", model.task_state_dict("a"), replace=True)
    assert other.num_classes("copy") == 5
    _assert_bit_identical(before, model.backbone_state_dict())


def test_bad_task_inputs_raise_clear_errors():
    model = _model_with_tasks("vit")
    images = make_images("vit")
    with pytest.raises(TaskNotFoundError, match=r"unknown task 'zzz'; known tasks: a, b, c"):
        model(images, ["a", "zzz", "a"])
    with pytest.raises(KeyError):  # also the builtin a Python user would catch
        model(images, "zzz")
    with pytest.raises(BatchMismatchError, match="2 task names for a batch of 3"):
        model(images, ["a", "b"])
    with pytest.raises(BatchMismatchError):
        model(images, torch.tensor([0, 1]))
    with pytest.raises(TaskNotFoundError, match="task index 3 is out of range for 3 tasks"):
        model(images, torch.tensor([0, 3, 1], device=images.device))
    with pytest.raises(DuplicateTaskError, match="'a' already exists"):
        model.add_task("a", 3)
    with pytest.raises(TaskNotFoundError):
        model.fold("zzz")
    with pytest.raises(TaskNotFoundError):
        model.remove_task("zzz")


def test_state_dict_for_another_backbone_names_the_key():
    vit = _model_with_tasks("vit")
    convnext = MultiTaskSSF(make_backbone("convnext"))
    with pytest.raises(StateDictMismatchError, match="missing key 'stem.0.ssf_scale'"):
        convnext.load_task("x", vit.task_state_dict("a"))
    state = vit.task_state_dict("a")
    state["blocks.0.attn.qkv.ssf_scale"] = torch.ones(5)
    with pytest.raises(StateDictMismatchError, match=r"'blocks.0.attn.qkv.ssf_scale' has shape \(5,\)"):
        vit.load_task("x", state)
    state = vit.task_state_dict("a")
    state["head.weight"] = torch.ones(5, 3)
    with pytest.raises(StateDictMismatchError, match="head.weight"):
        vit.load_task("x", state)
    assert "x" not in vit.task_names


def test_backbone_errors():
    import timm

    with pytest.raises(BackboneError, match="num_classes=0"):
        MultiTaskSSF(timm.create_model("test_vit", num_classes=10))
    with pytest.raises(BackboneError, match="not a timm model"):
        MultiTaskSSF(torch.nn.Linear(3, 3))

    class NoSites(torch.nn.Module):
        num_features = 3

        def forward_features(self, x):
            return torch.relu(x)

        def forward_head(self, x, pre_logits=False):
            return x

        def get_classifier(self):
            return torch.nn.Identity()

        def reset_classifier(self, num_classes):
            pass

    with pytest.raises(NoSitesError, match="no supported SSF site"):
        MultiTaskSSF(NoSites())


@pytest.mark.parametrize("keep_input", [None, True, False])
@pytest.mark.parametrize("family", ["vit", "convnext", "resnet", "swin"])
def test_fast_path_matches_eager_outputs_and_gradients(family, keep_input):
    """The fused single-task path (used on GPU) computes the same values and gradients as the eager path.

    ``keep_input``: None keeps each site's own choice (ViT's ``proj`` keeps its input off the block chain, and
    nothing on it); True/False force every site off the chain to recompute ``z`` from its input, or to read it
    off its output. For ViT this runs the block chain of ``adapters.vit_block``.
    """
    results = {}
    for fast in (False, True):
        model = _model_with_tasks(family, sigma=0.2)
        model.set_fast_path(fast)
        for site in model.sites if keep_input is not None else ():
            site.keep_input = keep_input
        images = make_images(family).requires_grad_(True)
        model.train()
        logits = model(images, "a")[:, :5]
        (logits * torch.linspace(-1, 1, 5, device=logits.device)).sum().backward()
        grads = {name: site.ssf_scale.grad.clone() for name, site in model.named_sites()}
        grads.update(
            {f"{n}.shift": s.ssf_shift.grad.clone() for n, s in model.named_sites() if s.ssf_shift is not None}
        )
        results[fast] = (logits.detach(), images.grad.clone(), grads, model.head_weight.grad.clone())
    eager, fast = results[False], results[True]
    assert_close(fast[0], eager[0], rtol=1e-5, atol=1e-5)
    assert_close(fast[1], eager[1], rtol=1e-4, atol=1e-6)
    for key in eager[2]:
        assert_close(fast[2][key], eager[2][key], rtol=1e-4, atol=1e-6, msg=key)
    assert_close(fast[3], eager[3], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("image", "kernel", "bias"),
    [((2, 3, 32, 32), (16, 16), True), ((1, 4, 35, 30), (8, 6), True), ((2, 3, 12, 12), (4, 4), False)],
)
def test_patchify_linear_is_the_conv(image, kernel, bias):
    """The patch embedding as one GEMM (what CUDA runs, see ``patchify_linear``) is the conv, ragged edges dropped."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(image, generator=generator, dtype=torch.float64)
    weight = torch.randn(5, image[1], *kernel, generator=generator, dtype=torch.float64)
    b = torch.randn(5, generator=generator, dtype=torch.float64) if bias else None
    out = patchify_linear(x, weight, b)
    assert_close(out, torch.nn.functional.conv2d(x, weight, b, stride=kernel))
    assert out.flatten(2).transpose(1, 2).is_contiguous()  # a ViT's reshape to tokens is a view
    # an unbatched image is the conv's too; one smaller than a patch fails as the conv does
    assert_close(patchify_linear(x[0], weight, b), torch.nn.functional.conv2d(x[0], weight, b, stride=kernel))
    with pytest.raises(RuntimeError):
        patchify_linear(x[..., : kernel[0] - 1, :], weight, b)


def test_one_task_tables_give_their_rows_as_views():
    """A one-task table (as training holds it) hands out its row as a view, whose backward copies nothing; other
    tables and indices still index (and an index out of range still fails)."""
    model = MultiTaskSSF(make_backbone("vit"))
    model.add_task("a", 4)
    site = next(s for s in model.sites if s.ssf_shift is not None)
    for index in (0, -1):
        scale, shift = site.task_rows(index)
        assert scale._base is site.ssf_scale and shift._base is site.ssf_shift
        assert scale.shape == shift.shape == (site.channels,)
        assert type(scale.grad_fn).__name__ == "ViewBackward0"  # not select's, which writes a zeroed table
    (scale * 2 + shift).sum().backward()
    assert_close(site.ssf_scale.grad, torch.full((1, site.channels), 2.0))
    with pytest.raises(IndexError):
        site.task_rows(1)
    model.add_task("b", 4)
    scale, _ = site.task_rows(1)
    assert type(scale.grad_fn).__name__ == "SelectBackward0" and torch.equal(scale, site.ssf_scale[1])


def test_mixed_forward_traces_without_graph_breaks():
    """The task-index check (a host sync) is skipped while compiling: one graph, as CUDA graphs need."""
    model = _model_with_tasks("vit")
    images = make_images("vit")
    tasks = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
    torch._dynamo.reset()
    with torch.inference_mode():
        explanation = torch._dynamo.explain(model)(images, tasks)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_mixed_attention_path_equals_timm_attention(monkeypatch):
    """The mixed-batch attention path (raw qkv in, SSF moved through the softmax) gives timm's outputs.

    The Triton kernel needs CUDA (tests/test_gpu.py checks it against an fp64 reference); here it is replaced
    by that reference, so what is tested is everything around it: which modules take the path, with which
    tables, rows and heads, and the output projection after it.
    """
    from ssf_tasks.adapters import vit_attention
    from ssf_tasks.kernels import mixed_attention

    calls = []

    def reference(qkv, scale_table, shift_table, task_rows, num_heads):
        calls.append(num_heads)
        return mixed_attention.mixed_ssf_attention_reference(qkv, scale_table, shift_table, task_rows, num_heads)

    monkeypatch.setattr(vit_attention, "mixed_attention_available", lambda x, dtype=None: True)
    monkeypatch.setattr(vit_attention, "mixed_ssf_attention", reference)
    model = _model_with_tasks("vit", sigma=0.3)
    images = make_images("vit")
    tasks = torch.tensor([2, 0, 2, 1][: images.shape[0]], device=images.device)
    with torch.no_grad():
        fused = model(images, tasks)
        model.set_mixed_attention(False)
        timm_attention = model(images, tasks)
        model.set_mixed_attention(True)
        model(images, "b")  # one task per batch: timm's forward, never the mixed path
    blocks = model.backbone.blocks
    assert calls == [blk.attn.num_heads for blk in blocks]  # once per block, mixed batch only
    assert_close(fused, timm_attention, rtol=1e-5, atol=1e-5)


def test_graphed_forward_needs_cuda_inputs():
    from ssf_tasks import GraphedForward, SSFTasksError

    model = _model_with_tasks("vit")
    with pytest.raises(SSFTasksError, match="every input must be a CUDA tensor"):
        GraphedForward(model, torch.zeros(2, 3, 8, 8, device="meta"), torch.zeros(2, dtype=torch.long))


def test_mixed_attention_sees_the_dtype_autocast_gives_the_qkv_projection():
    """Under autocast, LayerNorm hands attention fp32 but qkv comes out in bf16: the kernel is judged on the latter."""
    from ssf_tasks.kernels.mixed_attention import linear_output_dtype

    x = torch.zeros(2, 4)
    assert linear_output_dtype(x) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear_output_dtype(x) == torch.bfloat16
        assert torch.nn.functional.linear(x, torch.zeros(3, 4)).dtype == torch.bfloat16
