"""Data-parallel training (``task add --nproc N``) on the CPU with gloo: one stored version, the one-process result,
only γ/β and the head in the all-reduce, and clean failures that stop every rank and store nothing.

The runs train with the whole training split as one batch, so that with two processes each step's averaged gradient
is mathematically the one-process gradient. From a random head the two runs then agree to float rounding. From the
default probe head they agree within noise only: the probe's L-BFGS fit turns the rounding differences of features
computed in batches of 12 or of 6 into differences of about 1e-4 in the head, which Adam's first steps amplify.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from conftest import write_image_folder
from ssf_tasks import MultiTaskSSF, TrainingError, TrainingInterrupted, registry
from ssf_tasks.config import TrainConfig
from ssf_tasks.engine import evaluate_task
from ssf_tasks.taskfiles import task_tensors
from ssf_tasks.training_job import train_and_store
from ssf_tasks_cli.main import app

CLASSES = ["airplane", "frog", "ship"]
TRAIN_PER_CLASS = 4
BATCH = TRAIN_PER_CLASS * len(CLASSES)  # the whole training split: one step per epoch
TRAIN_ARGS = ["--epochs", "3", "--batch-size", str(BATCH), "--lr", "0.01", "--input-size", "32", "--device", "cpu"]


def invoke(url: str, *args: object):
    return CliRunner().invoke(app, ["--registry", url, *map(str, args)])


def ok(url: str, *args: object):
    result = invoke(url, *args)
    assert result.exit_code == 0, result.output
    return result


def snapshot(url: str) -> tuple:
    """Every backbone and every version of every task, with its payload hash."""
    engine = registry.open_registry(url)
    try:
        with Session(engine) as s:
            backbones = [b.model_dump_json() for b in registry.list_backbones(s)]
            tasks = [
                v.model_dump_json() for t in registry.list_tasks(s) for v in registry.list_task_versions(s, t.name)
            ]
        return tuple(backbones), tuple(tasks)
    finally:
        engine.dispose()


def stored_tensors(url: str, name: str) -> dict[str, torch.Tensor]:
    engine = registry.open_registry(url)
    try:
        with Session(engine) as s:
            return task_tensors(registry.get_task_payload(s, name), name)
    finally:
        engine.dispose()


def assert_clean_error(result, *needles: str, code: int = 1) -> None:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def assert_no_rank_left() -> None:
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("ssf-tasks rank")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The same task trained by one process and by two, each into a registry of its own.

    The test split holds one image filed under the wrong class, so its top-1 is below 100% and counting an image
    twice (or missing one) would show.
    """
    root = tmp_path_factory.mktemp("ddp")
    torch.manual_seed(0)
    save_file(timm.create_model("test_resnet").state_dict(), root / "w.safetensors")
    write_image_folder(root / "data", CLASSES, {"train": TRAIN_PER_CLASS, "test": 3})
    stray = next((root / "data" / "test" / "ship").glob("*.jpg"))
    stray.rename(root / "data" / "test" / "frog" / stray.name)
    outputs, urls = {}, {}
    for nproc in (1, 2):
        urls[nproc] = f"sqlite:///{root / f'registry{nproc}.db'}"
        ok(urls[nproc], "backbone", "add", "tr", "--model", "test_resnet", "--weights", root / "w.safetensors")
        outputs[nproc] = ok(
            urls[nproc], "task", "add", "cifar", "--backbone", "tr", "--data", root / "data", *TRAIN_ARGS,
            "--nproc", nproc,
        ).output  # fmt: skip
    return {"root": root, "data": root / "data", "urls": urls, "outputs": outputs}


@pytest.fixture
def url(runs, tmp_path) -> str:
    """A private copy of the two-process registry, for tests that try to change it."""
    db = tmp_path / "registry.db"
    shutil.copy(runs["urls"][2].removeprefix("sqlite:///"), db)
    return f"sqlite:///{db}"


def test_two_processes_store_one_version_that_loads_and_predicts(runs, tmp_path):
    url = runs["urls"][2]
    assert "stored task 'cifar' version 1" in runs["outputs"][2]
    backbones, tasks = snapshot(url)
    assert len(backbones) == 1 and len(tasks) == 1
    record = json.loads(tasks[0])
    assert record["train_config"]["nproc"] == 2 and record["train_config"]["batch_size"] == BATCH
    assert record["metrics"]["epochs_run"] == 3 and record["metrics"]["best_epoch"] == 3

    # The stored γ/β and head load and predict every test image, and scoring them again in one process gives the
    # test top-1 the two ranks measured on their shards: each image counted once.
    images = sorted((runs["data"] / "test").glob("*/*.jpg"))
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,task\n" + "".join(f"{path},cifar\n" for path in images))
    out = tmp_path / "predictions.csv"
    ok(url, "predict", manifest, "--out", out, "--device", "cpu")
    rows = out.read_text().splitlines()[1:]
    assert len(rows) == len(images) == 9 and all(row.split(",")[2] in CLASSES for row in rows)
    engine = registry.open_registry(url)
    try:
        top1, split, count = evaluate_task(engine, "cifar", runs["data"], device="cpu")
    finally:
        engine.dispose()
    assert (split, count) == ("test", 9)
    assert record["metrics"]["test_top1"] == pytest.approx(top1, abs=1e-9)
    assert top1 < 1.0  # the image filed under the wrong class


def _initial_state(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """The γ/β that ``task add`` starts a task from (the head is the probe's or random)."""
    start = MultiTaskSSF(timm.create_model("test_resnet", num_classes=0))
    start.add_task(name, len(CLASSES), generator=torch.Generator().manual_seed(seed))
    return start.task_state_dict(name)


def _gamma_beta(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([value.flatten() for key, value in sorted(state.items()) if ".ssf_" in key])


def test_two_processes_train_what_one_does(url, runs):
    engine = registry.open_registry(url)
    config = TrainConfig(epochs=3, batch_size=BATCH, lr=0.01, input_size=32, device="cpu", head_init="random")
    try:
        for nproc in (1, 2):
            new = config.model_copy(update={"nproc": nproc})
            train_and_store(engine, f"exact{nproc}", "tr", runs["data"], new)
    finally:
        engine.dispose()
    one, two = stored_tensors(url, "exact1"), stored_tensors(url, "exact2")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=1e-4, msg=key)

    # ... and that agreement is not the trivial one: three steps moved γ/β far more than the tolerance.
    moved = (_gamma_beta(one) - _gamma_beta(_initial_state("exact1"))).abs().max().item()
    assert moved > 1000 * 1e-5, moved


def test_from_the_probe_head_two_processes_agree_with_one_within_noise(runs):
    records = [json.loads(snapshot(runs["urls"][n])[1][0]) for n in (1, 2)]
    assert records[1]["metrics"]["test_top1"] == pytest.approx(records[0]["metrics"]["test_top1"], abs=1 / 9)
    one, two = (_gamma_beta(stored_tensors(runs["urls"][n], "cifar")) for n in (1, 2))
    moved = (one - _gamma_beta(_initial_state("cifar"))).abs().mean()
    assert (two - one).abs().mean() < 0.1 * moved, ((two - one).abs().mean(), moved)


def test_the_all_reduce_carries_only_the_tasks_gamma_beta_and_head(runs):
    reduced = int(re.search(r"each step all-reduced (\d+) numbers", runs["outputs"][2]).group(1))
    model = MultiTaskSSF(timm.create_model("test_resnet", num_classes=0))
    model.add_task("cifar", len(CLASSES))
    trainable = model.ssf_parameters_per_task + len(CLASSES) * (model.num_features + 1)
    backbone = sum(p.numel() for p in model.backbone_state_dict().values())
    assert reduced == trainable
    assert reduced < backbone / 10, (reduced, backbone)
    assert "all-reduced" not in runs["outputs"][1]  # one process: nothing to reduce


def test_bad_nproc_or_batch_is_a_clean_error_and_changes_nothing(url, runs):
    before = snapshot(url)
    args = ["task", "add", "other", "--backbone", "tr", "--data", runs["data"], *TRAIN_ARGS]
    assert_clean_error(invoke(url, *args, "--nproc", "0"), "--nproc", code=2)
    odd = [*args, "--batch-size", "5", "--nproc", "2"]
    assert_clean_error(invoke(url, *odd), "--batch-size 5 does not split over 2 processes")
    assert snapshot(url) == before


def test_a_failing_rank_stops_every_rank_and_stores_nothing(url, runs):
    before = snapshot(url)
    result = invoke(url, "task", "add", "other", "--backbone", "tr", "--data", runs["data"], *TRAIN_ARGS,
                    "--nproc", "2", "--lr", "1e30")  # fmt: skip
    assert_clean_error(result, "training of 'other' stopped: the loss became", "--lr")
    assert snapshot(url) == before
    assert_no_rank_left()


def _train_two(url: str, data: Path, progress) -> None:
    engine = registry.open_registry(url)
    config = TrainConfig(epochs=3, batch_size=BATCH, input_size=32, device="cpu", nproc=2)
    try:
        train_and_store(engine, "other", "tr", data, config, progress=progress)
    finally:
        engine.dispose()


def test_a_killed_rank_stops_every_rank_and_stores_nothing(url, runs):
    before = snapshot(url)

    def kill_rank_1(report) -> None:
        for process in multiprocessing.active_children():
            if process.name == "ssf-tasks rank 1":
                os.kill(process.pid, signal.SIGKILL)

    with pytest.raises(TrainingError, match=r"process 1 of 2 was killed by signal 9 .* nothing was stored"):
        _train_two(url, runs["data"], kill_rank_1)
    assert snapshot(url) == before
    assert_no_rank_left()


def test_ctrl_c_stops_every_rank_and_stores_nothing(url, runs):
    before = snapshot(url)

    def interrupt(report) -> None:
        raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted, match="all 2 processes were stopped and nothing was changed"):
        _train_two(url, runs["data"], interrupt)
    assert snapshot(url) == before
    assert_no_rank_left()
