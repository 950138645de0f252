"""``ssf-tasks bench accuracy`` on CPU: a row per dataset and method, exact trainable parameter counts, honest scores.

A tiny timm ViT (random weights saved to a local file) and tiny generated JPEG datasets; one seed and one epoch, so
the numbers say nothing about the methods, only that the harness measures what it says it does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from conftest import write_image_folder
from ssf_tasks import MultiTaskSSF, registry
from ssf_tasks.config import TrainConfig
from ssf_tasks_bench.accuracy import DEFAULT_GRIDS, LORA_RANK, METHODS, backbone_record, bench_accuracy, lora_targets
from ssf_tasks_cli.main import app

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 40)}
SPLITS = {"train": 4, "val": 2, "test": 3}
ARGS = ["--seeds", "1", "--epochs", "1", "--batch-size", "8", "--device", "cpu"]


def write_colours(root: Path) -> None:
    """Classes of solid distinct colours (a little brightness jitter per image): linearly separable by any features."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for split, count in SPLITS.items():
        for name, rgb in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                shift = int(torch.randint(-8, 9, (1,), generator=generator))
                colour = tuple(min(255, max(0, c + shift)) for c in rgb)
                Image.new("RGB", (32, 32), colour).save(folder / f"{i}.jpg", quality=95)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("accuracy")
    torch.manual_seed(0)
    save_file(timm.create_model("test_vit").state_dict(), root / "w.safetensors")
    write_colours(root / "colours")
    write_image_folder(root / "noisy", ["airplane", "frog", "ship"], SPLITS)
    return root


def invoke(url: str, *args) -> object:
    return CliRunner().invoke(app, ["--registry", url, *map(str, args)])


@pytest.fixture(scope="module")
def run(workdir) -> tuple[dict, str]:
    """One run of every method on both datasets, through the command line."""
    out = workdir / "out.json"
    data = ["--data", workdir / "colours", "--data", workdir / "noisy"]
    weights = workdir / "w.safetensors"
    model = ["--model", "test_vit", "--weights", weights]
    result = invoke(f"sqlite:///{workdir / 'unused.db'}", "bench", "accuracy", *model, *data, *ARGS, "--out", out)
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text()), result.output


def expected_params() -> dict[str, int]:
    """Trainable numbers of each method on test_vit, counted here from the model itself (head excluded)."""
    torch.manual_seed(0)
    vit = timm.create_model("test_vit", num_classes=0)
    linears = [vit.get_submodule(name) for name in lora_targets(vit)]
    return {
        "linear": 0,
        "bitfit": sum(p.numel() for n, p in vit.named_parameters() if n.endswith(".bias")),
        "full": sum(p.numel() for p in vit.parameters()),
        "lora": sum(LORA_RANK * (m.in_features + m.out_features) for m in linears),
        "ssf": MultiTaskSSF(vit).ssf_parameters_per_task,
        "ssf-defaults": MultiTaskSSF(vit).ssf_parameters_per_task,
    }


def test_every_method_gives_a_row_per_dataset_with_scores_in_range(run):
    results, output = run
    rows = results["rows"]
    assert [(r["dataset"], r["method"]) for r in rows] == [(d, m) for d in ("colours", "noisy") for m in METHODS]
    for row in rows:
        if row["method"] == "lora" and not row["test_top1"]:
            continue  # peft not installed: checked below
        assert len(row["test_top1"]) == 1 and row["seeds"] == 1
        assert all(0.0 <= top1 <= 1.0 for top1 in row["test_top1"])
        assert row["test_top1_mean"] == row["test_top1"][0] and row["test_top1_std"] == 0.0
        assert f"| {row['dataset']} | {row['method']} | {row['trainable_params']:,} |" in output
        if row["method"] == "ssf-defaults":  # task add with no flags: nothing searched, the config's defaults
            assert row["grid"] == {} and row["chosen"] == TrainConfig().lr and row["epochs"] == TrainConfig().epochs
            continue
        # The chosen value is the grid's best on val (the test split plays no part in the choice).
        assert len(row["grid"]) == len(DEFAULT_GRIDS.get(row["method"], DEFAULT_GRIDS["ssf"]))
        assert row["val_top1"] == max(v for v in row["grid"].values() if v is not None)
        assert row["grid"][f"{row['chosen']:g}"] == row["val_top1"]
        assert row["seconds_per_run"] > 0
    assert results["environment"]["backbone"]["timm_name"] == "test_vit"
    assert results["environment"]["config"]["epochs"] == 1


def test_trainable_parameter_counts_are_exact(run):
    rows, expected = run[0]["rows"], expected_params()
    for row in rows:
        head = 64 * row["classes"] + row["classes"]  # test_vit's 64 features -> the dataset's classes
        if row["method"] == "lora" and not row["test_top1"]:
            assert row["note"] == "skipped: peft not installed" and row["trainable_params"] is None
            continue
        assert row["trainable_params"] == expected[row["method"]] + head, row["method"]
    assert {r["classes"] for r in rows} == {4, 3}


def test_linear_probe_separates_solid_colours(run):
    (probe,) = [r for r in run[0]["rows"] if r["dataset"] == "colours" and r["method"] == "linear"]
    assert probe["test_top1"] == [1.0]
    assert probe["images"] == {"train": 16, "val": 8, "test": 12}


def test_a_registered_backbone_is_used_and_its_registry_gets_no_tasks(workdir, tmp_path):
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    added = invoke(url, "backbone", "add", "vit", "--model", "test_vit", "--weights", workdir / "w.safetensors")
    assert added.exit_code == 0, added.output
    methods = ["--method", "linear", "--method", "ssf", "--grid", "ssf=0.01"]
    result = invoke(url, "bench", "accuracy", "--backbone", "vit", "--data", workdir / "colours", *methods, *ARGS)
    assert result.exit_code == 0, result.output
    assert "| colours | linear | 260 | l2 0.0001 |" in result.output
    engine = registry.open_registry(url)
    with Session(engine) as s:
        assert registry.list_tasks(s) == []
    engine.dispose()


def test_lora_is_skipped_with_a_reason_where_the_backbone_has_no_such_layers(workdir, tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "resnet.safetensors"
    save_file(timm.create_model("test_resnet").state_dict(), weights)
    assert lora_targets(timm.create_model("test_resnet")) == []
    assert len(lora_targets(timm.create_model("test_vit"))) == 4 * len(timm.create_model("test_vit").blocks)
    config = TrainConfig(epochs=1, device="cpu")
    (row,) = bench_accuracy([workdir / "colours"], backbone_record("test_resnet", weights), config, methods=["lora"])
    assert row["note"] == "skipped: the backbone has no Linear layers named qkv, proj, fc1 or fc2"
    assert row["test_top1"] == [] and row["trainable_params"] is None


@pytest.mark.parametrize(
    "args",
    [
        ["--data", "x"],  # neither --backbone nor --model
        ["--data", "x", "--backbone", "a", "--model", "test_vit"],
        ["--data", "x", "--model", "test_vit", "--grid", "ssf="],
        ["--data", "x", "--model", "test_vit", "--grid", "dora=0.1"],
        ["--data", "x", "--model", "test_vit", "--method", "dora"],
    ],
)
def test_bad_options_are_refused_before_any_work(tmp_path, args):
    result = invoke(f"sqlite:///{tmp_path / 'r.db'}", "bench", "accuracy", *args)
    assert result.exit_code == 2, result.output


def test_ablations_train_only_what_they_name(workdir):
    """Scale only trains every γ and no β; attention only trains the γ/β of the attention sites alone."""
    config = TrainConfig(epochs=1, batch_size=8, device="cpu")
    record = backbone_record("test_vit", workdir / "w.safetensors")
    rows = bench_accuracy([workdir / "colours"], record, config, methods=["ssf-scale", "ssf-attn"], seeds=1)
    torch.manual_seed(0)
    sites = MultiTaskSSF(timm.create_model("test_vit", num_classes=0)).named_sites()
    scales = sum(site.channels for _, site in sites)
    attention = sum(site.channels * (1 + (site.ssf_shift is not None)) for name, site in sites if ".attn." in name)
    assert 0 < attention < MultiTaskSSF(timm.create_model("test_vit", num_classes=0)).ssf_parameters_per_task
    head = 64 * 4 + 4
    assert [(r["method"], r["trainable_params"]) for r in rows] == [
        ("ssf-scale", scales + head),
        ("ssf-attn", attention + head),
    ]
    assert all(len(r["grid"]) == 3 and len(r["test_top1"]) == 1 for r in rows)


def test_warm_start_compares_cold_and_warm_runs_of_each_pair(workdir, tmp_path):
    """``bench warm-start``: the sources are stored first, ``auto`` picks among them, the warm runs really start from
    the source (its γ/β are the warm run's starting point, so epoch 0's probe differs from the cold one's)."""
    out = tmp_path / "warm.json"
    model = ["--model", "test_vit", "--weights", workdir / "w.safetensors"]
    pair = ["--source", workdir / "colours", "--target", workdir / "noisy"]
    args = ["--seeds", "2", "--epochs", "2", "--device", "cpu", "--workdir", tmp_path / "runs", "--out", out]
    result = invoke(f"sqlite:///{tmp_path / 'unused.db'}", "bench", "warm-start", *model, *pair, *args)
    assert result.exit_code == 0, result.output
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["source"], row["target"], row["auto_init_from"], row["seeds"]) == ("colours", "noisy", "colours", 2)
    cold = row["cold_val_curve"]
    assert (row["cold_best_val_top1"], row["cold_epochs_to_cold_best"]) == (max(cold), cold.index(max(cold)))
    warm_reached = [epoch for epoch, value in enumerate(row["warm_val_curve"]) if value >= max(cold)]
    assert row["warm_epochs_to_cold_best"] == (warm_reached[0] if warm_reached else None)
    for how in ("cold", "warm"):
        assert len(row[f"{how}_val_curve"]) == 3  # the probe head (epoch 0) and two epochs
        assert len(row[f"{how}_test_top1"]) == 2 and all(0 <= t <= 1 for t in row[f"{how}_test_top1"])
    engine = registry.open_registry(f"sqlite:///{tmp_path / 'runs' / 'registry.db'}")
    try:
        with Session(engine) as s:
            stored = {r.name: r.train_config.init_from for r in registry.list_tasks(s)}
    finally:
        engine.dispose()
    assert stored == {
        "colours": None,
        "noisy-auto": "colours",
        **{f"noisy-cold-colours-{seed}": None for seed in (0, 1)},
        **{f"noisy-warm-colours-{seed}": "colours" for seed in (0, 1)},
    }


def test_warm_start_needs_one_source_per_target(workdir, tmp_path):
    model = ["--model", "test_vit", "--weights", workdir / "w.safetensors"]
    pairs = ["--source", workdir / "colours", "--source", workdir / "noisy", "--target", workdir / "noisy"]
    result = invoke(f"sqlite:///{tmp_path / 'r.db'}", "bench", "warm-start", *model, *pairs)
    assert result.exit_code == 2
    assert "2 --source and 1 --target: give one --source per --target" in " ".join(result.output.split())
    assert not (tmp_path / "r.db").exists()
