"""``ssf-tasks task plot``: the numbers behind the picture, checked against the stored task and timm's own weights,
then the PNG itself and the command's bad inputs.

Tasks are trained for real through the command line on a ViT and a CNN (tiny timm models, CPU, JPEG files made
here); the expected numbers are computed from the registry's payload and from the weights file loaded into a plain
timm model, not through ``MultiTaskSSF``, so a plot that read the wrong rows, the wrong weights or folded along the
wrong axis would fail.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from sqlalchemy.orm import Session
from torch.testing import assert_close
from typer.testing import CliRunner

from conftest import write_image_folder
from ssf_tasks import registry
from ssf_tasks.engine import load_tasks
from ssf_tasks.plot import HISTOGRAM_SITES, Summary, TaskPlotData, task_plot_data
from ssf_tasks.taskfiles import task_tensors
from ssf_tasks_cli.main import app

CLASSES = ["airplane", "frog", "ship"]
PER_SPLIT = {"train": 4, "val": 2, "test": 2}
TRAIN = ["--epochs", "1", "--batch-size", "6", "--lr", "0.05", "--device", "cpu"]
# task -> (backbone, timm model, extra training options)
TASKS = {
    "vit-task": ("vit", "test_vit", []),
    "cnn-task": ("cnn", "test_resnet", ["--input-size", "64"]),
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def invoke(url: str, *args: object):
    return CliRunner().invoke(app, ["--registry", url, *map(str, args)])


def ok(url: str, *args: object):
    result = invoke(url, *args)
    assert result.exit_code == 0, result.output
    return result


def assert_clean_error(result, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A registry file with a ViT task and a CNN task (two versions), trained once for the module."""
    root = tmp_path_factory.mktemp("plot")
    write_image_folder(root / "data", CLASSES, PER_SPLIT)
    url = f"sqlite:///{root / 'registry.db'}"
    for task, (backbone, model, extra) in TASKS.items():
        torch.manual_seed(0)
        save_file(timm.create_model(model).state_dict(), root / f"{model}.safetensors")
        ok(url, "backbone", "add", backbone, "--model", model, "--weights", root / f"{model}.safetensors")
        ok(url, "task", "add", task, "--backbone", backbone, "--data", root / "data", *TRAIN, *extra)
    ok(url, "task", "add", "cnn-task", "--backbone", "cnn", "--data", root / "data", "--new-version", "--seed", "5",
       *TRAIN, *TASKS["cnn-task"][2])  # fmt: skip
    return root


@pytest.fixture
def url(trained, tmp_path) -> str:
    db = tmp_path / "registry.db"
    shutil.copy(trained / "registry.db", db)
    return f"sqlite:///{db}"


def stored(url: str, task: str, version: int | None = None) -> dict[str, torch.Tensor]:
    engine = registry.open_registry(url)
    try:
        with Session(engine) as s:
            return task_tensors(registry.get_task_payload(s, task, version), task)
    finally:
        engine.dispose()


def plot_data(url: str, task: str, version: int | None = None) -> TaskPlotData:
    engine = registry.open_registry(url)
    try:
        loaded = load_tasks(engine, [task], versions={task: version} if version else None)
        return task_plot_data(loaded.model_of(task), task, record=loaded.tasks[task])
    finally:
        engine.dispose()


def summaries(values: list[torch.Tensor]) -> torch.Tensor:
    """[mean, std (population), min, max] of each tensor, computed directly."""
    rows = []
    for v in values:
        v = v.double().flatten()
        rows.append(torch.stack([v.mean(), ((v - v.mean()) ** 2).mean().sqrt(), v.min(), v.max()]))
    return torch.stack(rows)


def as_tensor(stats: list[Summary]) -> torch.Tensor:
    return torch.tensor([[s.mean, s.std, s.min, s.max] for s in stats], dtype=torch.float64)


# ------------------------------------------------------------------------------------------------ the numbers
@pytest.mark.parametrize("task", list(TASKS))
def test_site_statistics_match_the_stored_task_and_timm_weights(trained, url, task):
    data = plot_data(url, task)
    state = stored(url, task)
    backbone, model, _ = TASKS[task]
    weights = load_file(trained / f"{model}.safetensors")  # the backbone as timm has it, no SSF involved

    names = [s.name for s in data.sites]
    assert sorted(names) == sorted(k.removesuffix(".ssf_scale") for k in state if k.endswith(".ssf_scale"))
    assert data.record is not None and data.record.backbone == backbone

    scales = [state[f"{n}.ssf_scale"] for n in names]
    assert_close(as_tensor([s.scale for s in data.sites]), summaries(scales))
    with_shift = [s for s in data.sites if s.shift is not None]
    assert {s.name for s in with_shift} == {k.removesuffix(".ssf_shift") for k in state if k.endswith(".ssf_shift")}
    assert with_shift, "every family here has sites with a shift"
    assert_close(
        as_tensor([s.shift for s in with_shift]), summaries([state[f"{s.name}.ssf_shift"] for s in with_shift])
    )

    before = [weights[f"{n}.weight"] for n in names]
    # Folding scales each output channel (dim 0) of the op's weight by γ.
    after = [w * g.view(-1, *[1] * (w.ndim - 1)) for w, g in zip(before, scales, strict=True)]
    assert_close(as_tensor([s.weight_before for s in data.sites]), summaries(before))
    assert_close(as_tensor([s.weight_after for s in data.sites]), summaries(after))
    assert [s.channels for s in data.sites] == [w.shape[0] for w in before]
    # A trained task is not the identity: the folded weights differ from the backbone's.
    assert any(s.weight_after.std != s.weight_before.std for s in data.sites)


@pytest.mark.parametrize("task", list(TASKS))
def test_weight_histograms_count_every_weight_before_and_after(trained, url, task):
    data = plot_data(url, task)
    state = stored(url, task)
    weights = load_file(trained / f"{TASKS[task][1]}.safetensors")
    ops = {s.name: s.op for s in data.sites}
    assert 1 <= len(data.histograms) <= HISTOGRAM_SITES
    assert all(ops[h.site] in ("Linear", "Conv2d") for h in data.histograms)  # sites with a weight matrix
    for h in data.histograms:
        before = weights[f"{h.site}.weight"].double()
        scale = state[f"{h.site}.ssf_scale"].double()
        # γ ⊙ W in float64, stored in the weight's float32, as folding does.
        after = (before * scale.view(-1, *[1] * (before.ndim - 1))).float().double()
        assert h.edges[0] <= min(before.min(), after.min()) and h.edges[-1] >= max(before.max(), after.max())
        assert h.before.sum() == before.numel() and h.after.sum() == after.numel()
        assert_close(h.before, torch.histogram(before.flatten(), h.edges).hist)
        assert_close(h.after, torch.histogram(after.flatten(), h.edges).hist)


def test_sites_are_in_forward_order(url):
    vit = [s.name for s in plot_data(url, "vit-task").sites]
    assert vit[0] == "patch_embed.proj" and vit[-1] == "norm"
    block = [n for n in vit if n.startswith("blocks.0.")]
    assert block == [f"blocks.0.{n}" for n in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")]
    cnn = [s.name for s in plot_data(url, "cnn-task").sites]
    assert cnn[:7] == ["conv1.0", "conv1.1", "conv1.3", "conv1.4", "conv1.6", "bn1", "layer1.0.conv1"]  # deep stem


def test_cli_plots_the_version_asked_for_with_every_version_listed(url, tmp_path, monkeypatch):
    import ssf_tasks.plot

    drawn: list[TaskPlotData] = []
    monkeypatch.setattr(ssf_tasks.plot, "draw_task_plot", lambda data, out: drawn.append(data) or Path(out))
    ok(url, "task", "plot", "cnn-task", "--version", "1", "--out", tmp_path / "v1.png")
    ok(url, "task", "plot", "cnn-task", "--out", tmp_path / "latest.png")
    first, latest = drawn
    assert first.record.version == 1 and latest.record.version == 2
    assert [r.version for r in first.versions] == [1, 2] == [r.version for r in latest.versions]
    assert all(r.metrics.epochs_run == 1 for r in first.versions)
    for r in first.versions:  # the curves drawn: epoch 0 is the probe head on val, then the one trained epoch
        assert [h["epoch"] for h in r.metrics.history] == [0.0, 1.0]
        assert {"loss", "train_top1", "val_top1"} <= set(r.metrics.history[1])
        assert r.metrics.history[r.metrics.best_epoch]["val_top1"] == r.metrics.val_top1
    for data, version in ((first, 1), (latest, 2)):
        state = stored(url, "cnn-task", version)
        expected = summaries([state[f"{s.name}.ssf_scale"] for s in data.sites])
        assert_close(as_tensor([s.scale for s in data.sites]), expected)


# ------------------------------------------------------------------------------------------------ the PNG
@pytest.mark.parametrize("task", list(TASKS))
def test_cli_writes_a_png(url, tmp_path, task):
    out = tmp_path / f"{task}.png"
    result = ok(url, "task", "plot", task, "--out", out)
    assert str(out) in result.output
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(out) as image:
        assert image.format == "PNG"
        width, height = image.size
        assert width >= 800 and height >= 600
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # drawn panels, not a blank canvas
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["nope"], ["nope"]),
        (["cnn-task", "--version", "7"], ["version 7"]),
        (["Bad Name"], ["Bad Name"]),
    ],
)
def test_unknown_task_or_version_is_a_one_line_error(url, tmp_path, args, needles):
    out = tmp_path / "plot.png"
    assert_clean_error(invoke(url, "task", "plot", *args, "--out", out), *needles)
    assert not out.exists()


def test_bad_output_paths_are_one_line_errors(url, tmp_path, monkeypatch):
    missing = tmp_path / "no-such-folder" / "plot.png"
    assert_clean_error(invoke(url, "task", "plot", "vit-task", "--out", missing), "does not exist")
    assert not missing.parent.exists()
    assert_clean_error(invoke(url, "task", "plot", "vit-task", "--out", tmp_path / "plot.jpg"), ".png", "plot.jpg")
    (tmp_path / "folder.png").mkdir()
    assert_clean_error(invoke(url, "task", "plot", "vit-task", "--out", tmp_path / "folder.png"), "is a folder")

    import ssf_tasks.plot

    monkeypatch.setattr(ssf_tasks.plot.os, "access", lambda path, mode: False)  # root may write anywhere
    assert_clean_error(invoke(url, "task", "plot", "vit-task", "--out", tmp_path / "p.png"), "not writable")
