"""Training one task: it learns, it is reproducible, and a failed run leaves everything as it was."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from conftest import make_backbone, write_image_folder
from ssf_tasks import MultiTaskSSF, TrainingError, TrainingInterrupted
from ssf_tasks.config import TrainConfig
from ssf_tasks.data import ImageDataset, build_transform
from ssf_tasks.train import evaluate, train_task

CLASSES = ["airplane", "frog", "ship"]


def _images(root, split: str, backbone) -> ImageDataset:
    samples = []
    for label, name in enumerate(CLASSES):
        samples += [(p, label) for p in sorted((root / split / name).glob("*.jpg"))]
    return ImageDataset(samples, build_transform(backbone, train=False, protocol="vtab", input_size=64))


@pytest.fixture
def setup(tmp_path):
    write_image_folder(tmp_path, CLASSES, {"train": 12, "val": 4})
    model = MultiTaskSSF(make_backbone("resnet"))
    model.add_task("other", 4, generator=torch.Generator().manual_seed(1))
    model.add_task("cifar", 3, generator=torch.Generator().manual_seed(2))
    train = _images(tmp_path, "train", model.backbone)
    val = _images(tmp_path, "val", model.backbone)
    return model, train, val


def _states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_learns_and_touches_nothing_else(setup):
    model, train, val = setup
    images = torch.stack([train[i][0] for i in range(4)])
    with torch.no_grad():
        other_before = model(images, "other")
    backbone_before = {k: v.clone() for k, v in model.backbone_state_dict().items()}
    config = TrainConfig(epochs=6, batch_size=12, lr=3e-2, warmup_epochs=1, device="cpu")
    before = evaluate(model, "cifar", train, device="cpu")
    result = train_task(model, "cifar", train, config, val_set=val, test_set=val)
    after = evaluate(model, "cifar", train, device="cpu")
    assert after > before and after >= 0.6, (before, after)
    assert result.epochs_run == 6 and 1 <= result.best_epoch <= 6
    assert result.val_top1 == max(h["val_top1"] for h in result.history)
    assert result.test_top1 == pytest.approx(evaluate(model, "cifar", val, device="cpu"))
    with torch.no_grad():
        assert torch.equal(model(images, "other"), other_before)
    for key, value in model.backbone_state_dict().items():
        assert torch.equal(value, backbone_before[key]), key


def test_training_is_reproducible(setup):
    model, train, _ = setup
    config = TrainConfig(epochs=2, batch_size=8, lr=1e-2, device="cpu", seed=7)
    initial = model.task_state_dict("cifar")
    train_task(model, "cifar", train, config)
    first = model.task_state_dict("cifar")
    model.update_task("cifar", initial)
    train_task(model, "cifar", train, config)
    assert _states_equal(first, model.task_state_dict("cifar"))


class _PoisonedDataset(Dataset):
    """Real images, with NaN pixels from the third sample on: a loss that turns non-finite mid-run."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image, label = self.base[index]
        return (image * float("nan") if index >= 2 else image), label


def test_nan_loss_stops_with_a_clear_error_and_changes_nothing(setup):
    model, train, _ = setup
    before = model.task_state_dict("cifar")
    config = TrainConfig(epochs=2, batch_size=2, lr=1e-2, device="cpu")
    with pytest.raises(TrainingError, match=r"loss became nan at epoch 1"):
        train_task(model, "cifar", _PoisonedDataset(train), config)
    assert _states_equal(before, model.task_state_dict("cifar"))
    assert model.task_names == ["other", "cifar"]


def test_ctrl_c_stops_cleanly_and_changes_nothing(setup):
    model, train, _ = setup
    before = model.task_state_dict("cifar")

    def interrupt(report):
        if report.step == 3:
            raise KeyboardInterrupt

    config = TrainConfig(epochs=2, batch_size=4, device="cpu")
    with pytest.raises(TrainingInterrupted, match="interrupted at epoch 1"):
        train_task(model, "cifar", train, config, progress=interrupt)
    assert _states_equal(before, model.task_state_dict("cifar"))


@pytest.mark.parametrize(
    ("adapt", "train_sites"), [("scale", None), ("shift", None), ("scale_shift", ["layer1.*", "fc"])]
)
def test_what_does_not_train_stays_exactly_identity(setup, adapt, train_sites):
    model, train, _ = setup
    config = TrainConfig(epochs=2, batch_size=12, lr=3e-2, device="cpu", adapt=adapt, train_sites=train_sites)
    train_task(model, "cifar", train, config)
    state = model.task_state_dict("cifar")
    sites = [name for name, _ in model.named_sites()]
    trained_sites = [n for n in sites if n.startswith("layer1.")] if train_sites else sites
    assert 0 < len(trained_sites) <= len(sites)
    for name in sites:
        scale, shift = state[f"{name}.ssf_scale"], state.get(f"{name}.ssf_shift")
        scale_trains = name in trained_sites and adapt != "shift"
        shift_trains = name in trained_sites and adapt != "scale"
        # A trained table moved off its random init; a pinned one is exactly identity (weight decay included).
        assert torch.equal(scale, torch.ones_like(scale)) is not scale_trains, name
        if shift is not None:
            assert torch.equal(shift, torch.zeros_like(shift)) is not shift_trains, name


def test_train_sites_matching_nothing_is_refused_and_changes_nothing(setup):
    from ssf_tasks.errors import PatternMatchError

    model, train, _ = setup
    before = model.task_state_dict("cifar")
    config = TrainConfig(epochs=1, batch_size=12, device="cpu", train_sites=["*.attn.*"])
    with pytest.raises(PatternMatchError, match=r"no SSF site matches \['\*\.attn\.\*'\]"):
        train_task(model, "cifar", train, config)
    assert _states_equal(before, model.task_state_dict("cifar"))


def test_refit_after_the_probe_head_won_is_the_probe_head_on_train_and_val(setup):
    """Best epoch 0 on val: the refit trains no γ/β, it fits the probe head again on every labelled image."""
    from torch.utils.data import ConcatDataset

    from ssf_tasks.train import TrainResult, fit_probe_head
    from ssf_tasks.training_job import _refit

    model, train, val = setup
    config = TrainConfig(epochs=3, batch_size=12, device="cpu")
    start = model.task_state_dict("cifar")
    both = ConcatDataset([train, val])
    selection = TrainResult(best_epoch=0, epochs_run=3, val_top1=0.5, test_top1=0.1, train_seconds=1.0)
    model.update_task("cifar", {k: v + 0.5 for k, v in start.items()})  # where the selection run left it
    result = _refit(train_task, model, "cifar", start, selection, both, val, config, None)

    refitted = model.task_state_dict("cifar")
    model.update_task("cifar", start)
    fit_probe_head(model, "cifar", both, config)  # no val: the middle L2 of PROBE_L2
    expected = model.task_state_dict("cifar")
    for key in expected:
        torch.testing.assert_close(refitted[key], expected[key], msg=key)
    assert any(not torch.equal(expected[k], start[k]) for k in expected if k.startswith("head."))
    assert result.best_epoch == 0 and result.val_top1 == 0.5 and result.epochs_run == 3
    assert result.test_top1 == pytest.approx(evaluate(model, "cifar", val, device="cpu"))
