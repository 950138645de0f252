"""The service layer used from Python, without the CLI: train, store, load, predict mixed tasks, export."""

from __future__ import annotations

import shutil

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from ssf_tasks import service
from ssf_tasks.config import TrainConfig
from ssf_tasks.errors import DataError, DuplicateTaskError, RegistryError, SSFTasksError, TaskNotFoundError
from ssf_tasks.registry import open_registry

CLASSES = ["airplane", "frog", "ship"]


@pytest.fixture
def engine(tmp_path, assets):
    torch.manual_seed(0)
    save_file(timm.create_model("test_resnet").state_dict(), tmp_path / "w.safetensors")
    for split, count in {"train": 4, "test": 2}.items():
        for name in CLASSES:
            folder = tmp_path / "data" / split / name
            folder.mkdir(parents=True)
            for image in sorted((assets / "datasets" / "cifar10" / split / name).glob("*.jpg"))[:count]:
                shutil.copy(image, folder / image.name)
    engine = open_registry(f"sqlite:///{tmp_path / 'registry.db'}")
    service.add_backbone(engine, "tr", "test_resnet", tmp_path / "w.safetensors")
    yield engine
    engine.dispose()


def test_python_flow(engine, tmp_path):
    config = TrainConfig(epochs=1, batch_size=4, lr=1e-2, input_size=64, device="cpu")
    first, result = service.train_and_store(engine, "a", "tr", tmp_path / "data", config)
    assert first.version == 1 and first.class_names == CLASSES and result.test_top1 is not None
    service.train_and_store(engine, "b", "tr", tmp_path / "data", config.model_copy(update={"seed": 1}))
    with pytest.raises(DuplicateTaskError):
        service.train_and_store(engine, "a", "tr", tmp_path / "data", config)

    images = sorted((tmp_path / "data" / "test").glob("*/*.jpg"))
    items = [(p, "ab"[i % 2]) for i, p in enumerate(images)]
    mixed = service.predict(engine, items, batch_size=4, device="cpu", top_k=2)
    assert [(p.path, p.task) for p in mixed] == items
    for task in "ab":  # a mixed batch gives each sample what a batch of its own task gives
        alone = service.predict(engine, [it for it in items if it[1] == task], device="cpu", top_k=2)
        same = [p for p in mixed if p.task == task]
        assert [p.labels for p in alone] == [p.labels for p in same]
        torch.testing.assert_close([p.scores for p in alone], [p.scores for p in same])

    loaded = service.load_tasks(engine, ["a", "b"])
    assert list(loaded.models) == ["tr"] and loaded.model_of("a") is loaded.model_of("b")
    assert loaded.data_config("a")["input_size"] == (3, 64, 64)

    out = service.export_task(engine, "a", tmp_path / "export")
    folded = timm.create_model("test_resnet", num_classes=3)
    folded.load_state_dict(load_file(out / "model.safetensors"), strict=True)

    with pytest.raises(TaskNotFoundError, match="row 1"):
        service.predict(engine, [(images[0], "nope")], device="cpu")
    with pytest.raises(DataError, match="--precision must be one of fp32, bf16, got 'fp16'"):
        service.predict(engine, [(images[0], "a")], device="cpu", precision="fp16")


def test_read_only_registry_fails_before_training(engine, tmp_path, monkeypatch):
    # A registry that cannot be written must be refused in the first second, not after the whole run.
    def must_not_train(*args, **kwargs):
        raise AssertionError("training started on a registry that cannot store its result")

    monkeypatch.setattr(service, "train_task", must_not_train)
    read_only = open_registry(f"sqlite:///file:{tmp_path / 'registry.db'}?mode=ro&uri=true")
    try:
        config = TrainConfig(epochs=1, batch_size=4, input_size=64, device="cpu")
        with pytest.raises(RegistryError, match="readonly"):
            service.train_and_store(read_only, "a", "tr", tmp_path / "data", config)
    finally:
        read_only.dispose()
    assert service.list_tasks(engine) == []


def test_failed_export_leaves_no_partial_files(engine, tmp_path):
    config = TrainConfig(epochs=1, batch_size=4, input_size=64, device="cpu")
    service.train_and_store(engine, "a", "tr", tmp_path / "data", config)
    out = tmp_path / "export"
    (out / "config.json").mkdir(parents=True)  # config.json cannot be replaced: the export must fail as a whole
    with pytest.raises(SSFTasksError, match="config.json"):
        service.export_task(engine, "a", out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]  # no model.safetensors, no temp files
