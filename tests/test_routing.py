"""Task-agnostic inference (``task: auto``): routing entries stored by ``task add``, the router's arithmetic, the
Predictor, ``predict`` manifests and the registry's bookkeeping (removed with their task, schema upgrade)."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import save_file
from sqlalchemy import text
from sqlalchemy.orm import Session
from torch.testing import assert_close

from conftest import write_image_folder
from ssf_tasks import registry
from ssf_tasks.catalog import add_backbone, remove_task
from ssf_tasks.config import TrainConfig
from ssf_tasks.engine import Predictor
from ssf_tasks.errors import InvalidNameError, SSFTasksError, TaskNotFoundError
from ssf_tasks.registry import SCHEMA_VERSION, open_registry
from ssf_tasks.routing import (
    ACCEPT_QUANTILE,
    KNN_K,
    NO_TASK,
    Router,
    build_entry,
    entry_from_payload,
    entry_payload,
    feature_layer,
)
from ssf_tasks.training_job import train_and_store

CLASSES = [f"c{i}" for i in range(6)]
CONFIG = TrainConfig(epochs=1, batch_size=6, lr=1e-2, input_size=48, device="cpu")


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=1)


def cluster(center: torch.Tensor, n: int, seed: int, spread: float = 0.05) -> torch.Tensor:
    return unit(center + spread * torch.randn(n, center.numel(), generator=torch.Generator().manual_seed(seed)))


# ------------------------------------------------------------------------------------------ the router alone
def test_router_picks_the_nearest_task_and_rejects_what_no_task_holds():
    axes = torch.eye(8)
    a = build_entry(cluster(axes[0], 20, 1), torch.arange(20) % 2, cluster(axes[0], 10, 2), depth=0.5)
    b = build_entry(cluster(axes[1], 20, 3), torch.arange(20) % 4, cluster(axes[1], 10, 4), depth=0.5)
    for method in ("knn", "prototype"):
        router = Router({"a": a, "b": b}, method, torch.device("cpu"))
        # closer to their task than most of its val images: above its 5% threshold
        near = [cluster(axes[0], 5, 5, 0.01), cluster(axes[1], 5, 6, 0.01)]
        routes = router.route(torch.cat([*near, unit(axes[2:7])]))
        assert [task for task, _ in routes] == ["a"] * 5 + ["b"] * 5 + [NO_TASK] * 5


def test_thresholds_are_the_quantile_of_own_val_scores():
    train, val = cluster(torch.ones(6), 12, 1, 0.5), cluster(torch.ones(6), 9, 2, 0.5)
    labels = torch.arange(12) % 3
    entry = build_entry(train, labels, val, depth=1.0)
    stored = entry.features.float()
    knn = (val @ stored.t()).topk(KNN_K, dim=1).values.mean(1)
    prototypes = unit(torch.stack([stored[labels == c].mean(0) for c in range(3)]))
    nearest_prototype = (val @ prototypes.t()).max(1).values
    assert entry.thresholds["knn"] == pytest.approx(float(torch.quantile(knn, ACCEPT_QUANTILE)), abs=1e-6)
    assert entry.thresholds["prototype"] == pytest.approx(
        float(torch.quantile(nearest_prototype, ACCEPT_QUANTILE)), abs=1e-6
    )


def test_an_entry_survives_its_payload_and_a_damaged_one_is_refused():
    entry = build_entry(cluster(torch.ones(4), 7, 1), torch.arange(7) % 2, None, depth=0.5)
    back = entry_from_payload(entry_payload(entry), "t")
    assert torch.equal(back.features, entry.features) and torch.equal(back.labels, entry.labels)
    assert back.thresholds == entry.thresholds and back.depth == 0.5
    with pytest.raises(SSFTasksError, match="routing entry of task 't' cannot be read"):
        entry_from_payload(entry_payload(entry)[:-9], "t")


def test_routing_depth_picks_a_feature_level():
    vit = timm.create_model("test_vit", num_classes=0)  # 6 blocks
    assert feature_layer(vit, 0.5) == 2 and feature_layer(vit, 1.0) is None
    with pytest.raises(SSFTasksError, match="routing depth"):
        feature_layer(vit, 0.0)


@pytest.mark.parametrize("name", ["auto", "none"])
def test_auto_and_none_cannot_name_a_task(name, tmp_path):
    engine = open_registry(f"sqlite:///{tmp_path / 'r.db'}")
    with pytest.raises(InvalidNameError, match=f"'{name}' cannot name a task"):
        train_and_store(engine, name, "tr", tmp_path, CONFIG)
    engine.dispose()


# ------------------------------------------------------------------------------------ stored tasks, routed
@pytest.fixture(scope="module")
def two_domains(tmp_path_factory):
    """A registry with tasks ``a`` (classes c0-c2) and ``b`` (c3-c5), each trained on its own dataset folder."""
    root = tmp_path_factory.mktemp("routing")
    torch.manual_seed(0)
    save_file(timm.create_model("test_resnet").state_dict(), root / "w.safetensors")
    write_image_folder(root / "all", CLASSES, {"train": 6, "val": 3, "test": 4}, size=48)
    for task, classes in (("a", CLASSES[:3]), ("b", CLASSES[3:])):
        for split in ("train", "val", "test"):
            for c in classes:
                shutil.copytree(root / "all" / split / c, root / task / split / c)
    url = f"sqlite:///{root / 'registry.db'}"
    engine = open_registry(url)
    add_backbone(engine, "tr", "test_resnet", root / "w.safetensors")
    for task in "ab":
        train_and_store(engine, task, "tr", root / task, CONFIG)
    engine.dispose()
    return root, url


def test_task_add_stores_a_routing_entry_per_version(two_domains):
    root, url = two_domains
    engine = open_registry(url)
    with Session(engine) as s:
        payloads = registry.get_task_routing(s, {"a": 1, "b": 1})
    assert sorted(payloads) == ["a", "b"]
    entry = entry_from_payload(payloads["a"], "a")
    assert entry.features.shape[0] == 18 and sorted(entry.labels.tolist()) == [0] * 6 + [1] * 6 + [2] * 6
    assert_close(entry.features.float().norm(dim=1), torch.ones(18), atol=1e-3, rtol=0)
    engine.dispose()


def test_auto_routes_each_image_to_its_task_and_answers_as_the_task_does(two_domains):
    root, url = two_domains
    engine = open_registry(url)
    items = [(f, t) for t in "ab" for f in sorted((root / t / "test").glob("*/*.jpg"))]
    predictor = Predictor(engine, device="cpu", threads=2)
    try:
        known = predictor.predict(items, batch_size=5)
        auto = predictor.predict([(f, "auto") for f, _ in items], batch_size=5)
        mixed = predictor.predict([(f, "auto" if i % 2 else t) for i, (f, t) in enumerate(items)], batch_size=5)
    finally:
        predictor.close()
    routed = [p.task for p in auto]
    assert sum(task == t for task, (_, t) in zip(routed, items, strict=True)) >= 0.8 * len(items)
    assert set(routed) <= {"a", "b", NO_TASK}
    for p, k in zip(auto, known, strict=True):
        assert p.route_score is not None and k.route_score is None
        if p.task == k.task:  # routed right: the very answer of the task given
            assert p.labels == k.labels
            assert_close(p.scores, k.scores)
        if p.task == NO_TASK:
            assert p.labels == [] and p.scores == []
    for i, (p, a, k) in enumerate(zip(mixed, auto, known, strict=True)):
        assert (p.task, p.labels) == ((a.task, a.labels) if i % 2 else (k.task, k.labels))
    engine.dispose()


def test_a_removed_task_is_routed_no_more(two_domains, tmp_path):
    root, url = two_domains
    copy = tmp_path / "registry.db"
    shutil.copy(root / "registry.db", copy)
    engine = open_registry(f"sqlite:///{copy}")
    predictor = Predictor(engine, device="cpu", threads=2)
    try:
        images = sorted((root / "b" / "test").glob("*/*.jpg"))
        assert "b" in {p.task for p in predictor.predict([(f, "auto") for f in images])}
        remove_task(engine, "b")
        assert predictor.refresh()["removed"] == ["b"]
        assert {p.task for p in predictor.predict([(f, "auto") for f in images])} <= {"a", NO_TASK}
        with Session(engine) as s:
            assert registry.get_task_routing(s, {"b": 1}) == {}
        with engine.connect() as conn:
            assert conn.execute(text("SELECT task_name FROM task_routing ORDER BY task_name")).scalars().all() == ["a"]
        remove_task(engine, "a")
        predictor.refresh()
        with pytest.raises(TaskNotFoundError, match="task 'auto' needs routing entries"):
            predictor.predict([(images[0], "auto")])
    finally:
        predictor.close()
        engine.dispose()


def test_predict_manifest_with_auto_writes_the_routed_task_and_its_score(two_domains, tmp_path):
    root, url = two_domains
    images = [sorted((root / t / "test").glob("*/*.jpg"))[0] for t in "ab"]
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,task\n" + "".join(f"{p},{t}\n" for p, t in zip(images, ["auto", "a"], strict=True)))
    out = tmp_path / "p.csv"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ssf_tasks_cli",
            "--registry",
            url,
            "predict",
            manifest,
            "--out",
            out,
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["path", "task", "label", "score", "route_score"]
    assert rows[0]["task"] in ("a", NO_TASK) and float(rows[0]["route_score"]) > 0
    assert rows[1]["task"] == "a" and rows[1]["route_score"] == ""


def test_opening_a_version_1_registry_adds_the_routing_table(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = open_registry(url)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE task_routing"))
        conn.execute(text("UPDATE schema_info SET schema_version = 1"))
    engine.dispose()
    engine = open_registry(url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT schema_version FROM schema_info")).scalar_one() == SCHEMA_VERSION == 2
        assert conn.execute(text("SELECT count(*) FROM task_routing")).scalar_one() == 0
    engine.dispose()


def test_init_from_auto_starts_from_the_task_whose_classes_look_alike(two_domains, tmp_path):
    root, url = two_domains
    copy = tmp_path / "registry.db"
    shutil.copy(root / "registry.db", copy)
    engine = open_registry(f"sqlite:///{copy}")
    auto = CONFIG.model_copy(update={"init_from": "auto"})
    for data, expected in (("b", "b"), ("a", "a")):
        record, _ = train_and_store(engine, f"like-{data}", "tr", root / data, auto)
        assert record.train_config.init_from == expected
    engine.dispose()
    empty = open_registry(f"sqlite:///{tmp_path / 'empty.db'}")
    add_backbone(empty, "tr", "test_resnet", root / "w.safetensors")
    record, _ = train_and_store(empty, "first", "tr", root / "a", auto)
    assert record.train_config.init_from is None  # nothing stored to start from: a cold start
    empty.dispose()
