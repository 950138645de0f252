"""End-to-end tests of the ``ssf-tasks`` command line, on a tiny timm model and a few real CIFAR-10 images.

Every command runs in-process through Typer's ``CliRunner``. Every bad input must end in a one-line
``error: ...`` with a non-zero exit code, no traceback, and the registry exactly as it was.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from conftest import write_image_folder
from ssf_tasks import registry
from ssf_tasks.errors import SSFTasksError
from ssf_tasks.taskfiles import task_tensors
from ssf_tasks_cli.main import app

CLASSES = ["airplane", "frog", "ship"]
PER_SPLIT = {"train": 6, "val": 2, "test": 3}
TRAIN_ARGS = ["--epochs", "2", "--batch-size", "6", "--lr", "0.01", "--input-size", "64", "--device", "cpu"]


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Local test_resnet weights and a 3-class dataset of JPEG files in ImageFolder layout."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    save_file(timm.create_model("test_resnet").state_dict(), root / "w.safetensors")
    write_image_folder(root / "data", CLASSES, PER_SPLIT)
    return root


def invoke(url: str, *args: str, **kwargs):
    return CliRunner().invoke(app, ["--registry", url, *map(str, args)], **kwargs)


def ok(url: str, *args: str, **kwargs):
    result = invoke(url, *args, **kwargs)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def trained(workdir, tmp_path_factory) -> Path:
    """A registry file holding backbone 'tr' and task 'cifar' (trained once for the module)."""
    db = tmp_path_factory.mktemp("trained") / "registry.db"
    url = f"sqlite:///{db}"
    ok(url, "backbone", "add", "tr", "--model", "test_resnet", "--weights", workdir / "w.safetensors")
    ok(url, "task", "add", "cifar", "--backbone", "tr", "--data", workdir / "data", *TRAIN_ARGS)
    return db


@pytest.fixture
def url(trained, tmp_path) -> str:
    """A private copy of the trained registry, so each test may change it."""
    db = tmp_path / "registry.db"
    shutil.copy(trained, db)
    return f"sqlite:///{db}"


def snapshot(url: str) -> tuple:
    """Everything in a registry: backbones, and every version of every task with its payload hash."""
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


def assert_clean_error(result, *needles: str, code: int = 1) -> None:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def write_manifest(path: Path, rows: list[tuple[Path | str, str]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "task"])
        writer.writerows((str(p), t) for p, t in rows)
    return path


def _test_images(workdir) -> list[Path]:
    return sorted((workdir / "data" / "test").glob("*/*.jpg"))


# ----------------------------------------------------------------------------------------------- the jobs


def test_backbone_and_task_listing(url):
    backbones = ok(url, "backbone", "list").output
    assert "tr" in backbones and "test_resnet" in backbones
    listing = ok(url, "task", "list").output.splitlines()
    assert listing[0].split()[:2] == ["NAME", "VERSION"] and listing[1].split()[:3] == ["cifar", "1", "tr"]
    record = json.loads(ok(url, "task", "list", "--json").output.splitlines()[0])
    assert record["class_names"] == CLASSES
    assert record["train_config"]["input_size"] == 64 and record["metrics"]["epochs_run"] == 2
    assert record["metrics"]["test_top1"] is not None
    shown = ok(url, "task", "show", "cifar").output
    assert '"name": "cifar"' in shown and "versions: 1" in shown


def test_task_add_reports_and_versions(url, workdir):
    result = ok(
        url, "task", "add", "cifar", "--backbone", "tr", "--data", workdir / "data", "--new-version", *TRAIN_ARGS
    )
    assert "version 2" in result.stdout and "test top-1" in result.stdout
    assert "versions: 1, 2" in ok(url, "task", "show", "cifar").output
    ok(url, "task", "rm", "cifar", "--version", "1")
    assert "versions: 2" in ok(url, "task", "show", "cifar").output


def test_training_is_reproducible(url, workdir):
    ok(url, "task", "add", "again", "--backbone", "tr", "--data", workdir / "data", *TRAIN_ARGS)
    first, second = (json.loads(ok(url, "task", "show", n).output.split("\nversions")[0]) for n in ("cifar", "again"))
    assert first["payload_sha256"] == second["payload_sha256"]


def test_init_from_copies_gamma_beta(url, workdir, monkeypatch):
    seen = {}
    import ssf_tasks.training_job as training_job

    real = training_job.train_task

    def spy(model, name, *args, **kwargs):
        seen.update(model.task_state_dict(name))
        return real(model, name, *args, **kwargs)

    monkeypatch.setattr(training_job, "train_task", spy)
    ok(url, "task", "add", "cont", "--backbone", "tr", "--data", workdir / "data", "--init-from", "cifar", *TRAIN_ARGS)
    engine = registry.open_registry(url)
    with Session(engine) as s:
        source = task_tensors(registry.get_task_payload(s, "cifar"), "cifar")
        record = registry.get_task(s, "cont")
    engine.dispose()
    assert record.train_config.init_from == "cifar"
    for key, value in source.items():  # same class names: γ/β and head all start from 'cifar'
        torch.testing.assert_close(seen[key], value)


def test_mixed_predict_export_and_eval(url, workdir, tmp_path):
    ok(url, "task", "add", "cifar-b", "--backbone", "tr", "--data", workdir / "data", *TRAIN_ARGS, "--seed", "3")
    images = _test_images(workdir)
    rows = [(p, "cifar" if i % 2 else "cifar-b") for i, p in enumerate(images)] + [(images[0], "cifar")]
    manifest = write_manifest(tmp_path / "manifest.csv", rows)
    out = tmp_path / "predictions.csv"
    ok(url, "predict", manifest, "--out", out, "--batch-size", "4")
    predicted = read_csv(out)
    assert list(predicted[0]) == ["path", "task", "label", "score"]
    assert [(Path(r["path"]), r["task"]) for r in predicted] == [(Path(p), t) for p, t in rows]
    assert all(r["label"] in CLASSES and 0 < float(r["score"]) <= 1 for r in predicted)
    assert predicted[-1]["label"] == predicted[1]["label"]  # same image, same task, other batch

    # The export loads into plain timm, both ways, and reproduces predict's answers for its task.
    export = tmp_path / "export"
    ok(url, "export", "cifar", "--out", export)
    config = json.loads((export / "config.json").read_text())
    assert config["architecture"] == "test_resnet" and config["label_names"] == CLASSES
    manual = timm.create_model(config["architecture"], num_classes=config["num_classes"]).eval()
    manual.load_state_dict(load_file(export / "model.safetensors"), strict=True)
    hub_style = timm.create_model(f"local-dir:{export}", pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=hub_style), is_training=False)
    from PIL import Image

    mine = [r for r in predicted if r["task"] == "cifar"]
    batch = torch.stack([transform(Image.open(r["path"]).convert("RGB")) for r in mine])
    with torch.no_grad():
        for model in (manual, hub_style):
            scores, labels = model(batch).softmax(-1).max(-1)
            assert [CLASSES[i] for i in labels] == [r["label"] for r in mine]
            torch.testing.assert_close(scores, torch.tensor([float(r["score"]) for r in mine]), atol=1e-5, rtol=0)

    # eval uses the stored transform and agrees with the test top-1 stored at training time.
    stored = json.loads(ok(url, "task", "list", "--json").output.splitlines()[0])["metrics"]["test_top1"]
    assert f"top-1 {100 * stored:.1f}%" in ok(url, "task", "eval", "cifar", "--data", workdir / "data").output


def test_predict_folder_with_top_k(url, workdir, tmp_path):
    out = tmp_path / "p.csv"
    ok(url, "predict", workdir / "data" / "test" / "frog", "--task", "cifar", "--out", out, "--top-k", "5")
    rows = read_csv(out)
    assert len(rows) == PER_SPLIT["test"] and {r["task"] for r in rows} == {"cifar"}
    assert rows[0]["label_3"] and rows[0]["label_4"] == ""  # only 3 classes
    assert sorted([rows[0]["label"], rows[0]["label_2"], rows[0]["label_3"]]) == CLASSES


def test_registry_round_trip(url, workdir, tmp_path):
    task_file = tmp_path / "cifar.ssf.safetensors"
    ok(url, "task", "export-file", "cifar", "--out", task_file)
    other = f"sqlite:///{tmp_path / 'other.db'}"
    assert_clean_error(invoke(other, "task", "import-file", task_file), "fingerprint", "backbone add")
    ok(other, "backbone", "add", "same-weights", "--model", "test_resnet", "--weights", workdir / "w.safetensors")
    assert "onto backbone 'same-weights'" in ok(other, "task", "import-file", task_file).output
    a, b = (json.loads(ok(u, "task", "list", "--json").output) for u in (url, other))
    assert a["payload_sha256"] == b["payload_sha256"] and a["class_names"] == b["class_names"]
    manifest = write_manifest(tmp_path / "m.csv", [(p, "cifar") for p in _test_images(workdir)])
    ok(url, "predict", manifest, "--out", tmp_path / "a.csv")
    ok(other, "predict", manifest, "--out", tmp_path / "b.csv")
    assert read_csv(tmp_path / "a.csv") == read_csv(tmp_path / "b.csv")
    before = snapshot(other)
    assert_clean_error(invoke(other, "task", "import-file", task_file), "already exists")
    assert snapshot(other) == before


def test_registry_from_environment(trained, tmp_path):
    db = tmp_path / "env.db"
    shutil.copy(trained, db)
    result = CliRunner().invoke(app, ["task", "list"], env={"SSF_TASKS_REGISTRY": f"sqlite:///{db}"})
    assert result.exit_code == 0 and "cifar" in result.output
    home = tmp_path / "home"
    env = {"SSF_TASKS_REGISTRY": None, "SSF_TASKS_HOME": str(home)}
    result = CliRunner().invoke(app, ["backbone", "list"], env=env)
    assert result.exit_code == 0 and "no backbones" in result.output and (home / "registry.db").is_file()


# ------------------------------------------------------------------------------------------------ bad input
# The matrix of bad inputs is tests/test_bad_inputs.py; here, the failures that need a run to happen first.


def test_read_only_registry_refuses_task_add_before_training(url, workdir, monkeypatch):
    import ssf_tasks.training_job as training_job

    def must_not_train(*args, **kwargs):
        raise AssertionError("training started although the result could not be stored")

    monkeypatch.setattr(training_job, "train_task", must_not_train)
    before = snapshot(url)
    read_only = f"sqlite:///file:{url.removeprefix('sqlite:///')}?mode=ro&uri=true"
    result = invoke(read_only, "task", "add", "ro", "--backbone", "tr", "--data", workdir / "data", *TRAIN_ARGS)
    assert_clean_error(result, "readonly")
    assert snapshot(url) == before


def test_nan_loss_stores_nothing(url, workdir):
    before = snapshot(url)
    args = ["--epochs", "2", "--batch-size", "3", "--lr", "1e30", "--input-size", "64", "--device", "cpu"]
    result = invoke(url, "task", "add", "boom", "--backbone", "tr", "--data", workdir / "data", *args)
    assert_clean_error(result, "loss became", "nothing was stored")
    assert snapshot(url) == before


def test_ctrl_c_stores_nothing(url, workdir, monkeypatch):
    import ssf_tasks.training_job as training_job

    real = training_job.train_task

    def interrupted_after_two_steps(*args, progress=None, **kwargs):
        def report(p):
            if p.step == 2:
                raise KeyboardInterrupt
            if progress is not None:
                progress(p)

        return real(*args, progress=report, **kwargs)

    monkeypatch.setattr(training_job, "train_task", interrupted_after_two_steps)
    before = snapshot(url)
    result = invoke(url, "task", "add", "stopped", "--backbone", "tr", "--data", workdir / "data", *TRAIN_ARGS)
    assert_clean_error(result, "interrupted", code=130)
    assert snapshot(url) == before


def test_changed_backbone_weights_are_refused(url, workdir, tmp_path):
    weights = tmp_path / "w.safetensors"
    shutil.copy(workdir / "w.safetensors", weights)
    ok(url, "backbone", "add", "mutable", "--model", "test_resnet", "--weights", weights)
    ok(url, "task", "add", "fragile", "--backbone", "mutable", "--data", workdir / "data", *TRAIN_ARGS)
    state = load_file(weights)
    first = next(iter(state))
    state[first] = state[first] + 1
    save_file(state, weights)
    manifest = write_manifest(tmp_path / "m.csv", [(_test_images(workdir)[0], "fragile")])
    assert_clean_error(invoke(url, "predict", manifest, "--out", tmp_path / "p.csv"), "changed", "mutable")
    assert_clean_error(invoke(url, "export", "fragile", "--out", tmp_path / "e"), "changed")


def test_debug_env_shows_the_exception(url):
    result = invoke(url, "task", "show", "nope", env={"SSF_TASKS_DEBUG": "1"})
    assert result.exit_code != 0 and isinstance(result.exception, SSFTasksError)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown on a machine without a GPU")
def test_bench_without_a_gpu_is_a_clean_error():
    result = CliRunner().invoke(app, ["bench", "fold", "--repeats", "3"])
    assert result.exit_code == 1
    assert "error: the benchmarks need a CUDA device" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["predict", "manifest.csv"], "Missing option '--out'"),
        (["task", "list", "--bogus"], "No such option: --bogus"),
        (["nope"], "No such command 'nope'"),
        (["task", "eval", "x", "--data", ".", "--device", "tpu"], "Invalid value for '--device'"),
        (["predict", "m.csv", "--out", "p.csv", "--precision", "fp8"], "Invalid value for '--precision'"),
    ],
)
def test_usage_errors_are_one_line(tmp_path, args, message):
    result = CliRunner().invoke(app, ["--registry", f"sqlite:///{tmp_path / 'r.db'}", *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output


def test_compiled_predict_equals_eager_predict(url, workdir, tmp_path):
    """The fast path (torch.compile, padded fixed-size batches, task indices as data) gives the same answers."""
    images = _test_images(workdir)
    rows = [(p, "cifar") for p in images[:5]] + [(images[5], "cifar")]  # 6 rows: the last batch of 4 is padded
    manifest = write_manifest(tmp_path / "m.csv", rows)
    ok(url, "predict", manifest, "--out", tmp_path / "eager.csv", "--batch-size", "4", "--no-compile")
    ok(url, "predict", manifest, "--out", tmp_path / "compiled.csv", "--batch-size", "4", "--compile")
    eager, compiled = read_csv(tmp_path / "eager.csv"), read_csv(tmp_path / "compiled.csv")
    assert [r["label"] for r in compiled] == [r["label"] for r in eager]
    torch.testing.assert_close(
        torch.tensor([float(r["score"]) for r in compiled]),
        torch.tensor([float(r["score"]) for r in eager]),
        atol=1e-5,
        rtol=0,
    )


def test_bf16_predict_scores_match_fp32_within_rounding(url, workdir, tmp_path):
    """``--precision bf16`` runs the same forward under bf16 autocast: every label's score within bf16 rounding."""
    folder = workdir / "data" / "test" / "frog"
    scores = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"{precision}.csv"
        ok(url, "predict", folder, "--task", "cifar", "--out", out, "--top-k", "3", "--precision", precision)
        scores[precision] = [
            {row[f"label{s}"]: float(row[f"score{s}"]) for s in ("", "_2", "_3")} for row in read_csv(out)
        ]
    assert len(scores["bf16"]) == len(scores["fp32"]) == PER_SPLIT["test"]
    for bf16, fp32 in zip(scores["bf16"], scores["fp32"], strict=True):
        assert bf16.keys() == fp32.keys() == set(CLASSES)
        for label, score in fp32.items():
            assert abs(bf16[label] - score) < 0.03, (label, bf16[label], score)
    differences = [abs(b[k] - f[k]) for b, f in zip(scores["bf16"], scores["fp32"], strict=True) for k in f]
    assert max(differences) > 0  # bf16 really ran: its rounding shows in the scores


@pytest.fixture
def bench_calls(monkeypatch):
    """A CUDA device as far as the bench commands can tell, and every benchmark function replaced by one that
    records the arguments it was given (by name, defaults left out) and returns one row."""
    import inspect

    from ssf_tasks_bench import common, fold, inference, training

    calls: list[tuple[str, dict]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(common, "environment", lambda: {"card": "test"})
    monkeypatch.setattr(common, "setup_cuda", lambda cudnn_benchmark=False: calls.append(("setup", cudnn_benchmark)))
    for module, name in ((inference, "bench_inference"), (training, "bench_training"), (fold, "bench_fold")):
        signature = inspect.signature(getattr(module, name))

        def record(*args, name=name, signature=signature, **kwargs):
            calls.append((name, dict(signature.bind(*args, **kwargs).arguments)))
            return [{"bench": name, "ms": 1.0}]

        monkeypatch.setattr(module, name, record)
    return calls


def test_bench_commands_pass_their_options_to_the_benchmarks(bench_calls, tmp_path):
    """Every option reaches its benchmark function; --out gets the environment and the rows."""
    cases = [
        (
            ["inference", "--batch", "8", "--batch", "1", "--no-peft", "--no-loop", "--mode", "reduce-overhead",
             "--profile", "--repeats", "5", "--cudnn-benchmark", "--out", tmp_path / "inference.json"],
            True,
            ("bench_inference", {"model_name": "vit_base_patch16_224", "batch_sizes": (8, 1), "peft": False,
                                 "loop": False, "repeats": 5, "compile_mode": "reduce-overhead", "profile": True}),
        ),
        (
            ["inference"],
            False,
            ("bench_inference", {"model_name": "vit_base_patch16_224", "batch_sizes": (256, 8, 1), "peft": True,
                                 "loop": True, "repeats": 20, "compile_mode": None, "profile": False}),
        ),
        (
            ["scale", "--tasks", "1", "--tasks", "1000", "--model", "test_vit", "--repeats", "3"],
            False,
            ("bench_inference", {"model_name": "test_vit", "batch_sizes": (256,), "task_counts": (1, 1000),
                                 "peft": False, "loop": False, "repeats": 3}),
        ),
        (
            ["training", "--only", "fused path", "--only", "budget=0.2", "--compiled-only", "--mode",
             "reduce-overhead", "--rounds", "1", "--no-peft", "--profile", "--repeats", "5"],
            False,
            ("bench_training", {"model_name": "vit_base_patch16_224", "compiled_variants": (True,), "peft": False,
                                "repeats": 5, "profile": True, "only": ("fused path", "budget=0.2"), "rounds": 1,
                                "compile_mode": "reduce-overhead"}),
        ),
        (
            ["training", "--eager-only"],
            False,
            ("bench_training", {"model_name": "vit_base_patch16_224", "compiled_variants": (False,), "peft": True,
                                "repeats": 20, "profile": False, "only": (), "rounds": 5, "compile_mode": None}),
        ),
        (
            ["fold", "--model", "test_vit", "--repeats", "3"],
            False,
            ("bench_fold", {"model_name": "test_vit", "repeats": 3}),
        ),
    ]  # fmt: skip
    for args, cudnn_benchmark, call in cases:
        bench_calls.clear()
        result = CliRunner().invoke(app, ["bench", *map(str, args)])
        assert result.exit_code == 0, (args, result.output)
        assert bench_calls == [("setup", cudnn_benchmark), call], args
        assert json.loads(result.output.splitlines()[0]) == {"card": "test"}  # the environment comes first
    written = json.loads((tmp_path / "inference.json").read_text())
    assert written["environment"] == {"card": "test"}
    assert written["rows"] == [{"bench": "bench_inference", "ms": 1.0}]


def test_bench_kernel_runs_the_micro_benchmark_it_names(monkeypatch):
    pytest.importorskip("triton")
    from ssf_tasks_bench.kernels import gelu_backward, patch_embed

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gelu_backward, "main", lambda sweep=False: calls.append(("gelu-backward", sweep)))
    monkeypatch.setattr(patch_embed, "main", lambda: calls.append(("patch-embed",)))
    for args in (["gelu-backward", "--sweep"], ["gelu-backward"], ["patch-embed"]):
        result = CliRunner().invoke(app, ["bench", "kernel", *args])
        assert result.exit_code == 0, result.output
    assert calls == [("gelu-backward", True), ("gelu-backward", False), ("patch-embed",)]
    result = CliRunner().invoke(app, ["bench", "kernel", "patch-embed", "--sweep"])  # no tiles to sweep
    assert result.exit_code == 2 and "has no tile sweep" in result.output


@pytest.mark.parametrize(
    "args",
    [["inference", "--batch", "8"], ["scale"], ["training", "--only", "linear"], ["fold"], ["kernel", "attention"]],
)
def test_bench_without_cuda_is_a_one_line_error(bench_calls, monkeypatch, args):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = CliRunner().invoke(app, ["bench", *args])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == ["error: the benchmarks need a CUDA device (none is visible to torch)"]
    assert bench_calls == []  # nothing was set up or run


def test_task_add_option_defaults_are_the_training_defaults():
    """`task add` with no flags trains with TrainConfig's defaults: what BENCHMARKS measures as "the defaults"."""
    import typer.main

    from ssf_tasks.config import TrainConfig

    add = typer.main.get_command(app).commands["task"].commands["add"]
    options = {p.name: p.default for p in add.params if p.name in TrainConfig.model_fields}
    assert {"epochs", "lr", "weight_decay", "warmup_epochs", "batch_size", "head_init", "adapt"} <= set(options)
    for field, default in options.items():
        expected = TrainConfig.model_fields[field].default
        assert default == expected, f"--{field.replace('_', '-')} defaults to {default!r}, TrainConfig to {expected!r}"


def test_refit_stores_a_plain_run_on_train_and_val_for_the_chosen_epochs(url, workdir, tmp_path):
    """`--refit`: val/ picks the epoch count, then a run on train/ + val/ for that many epochs is what gets stored."""
    from ssf_tasks.data import load_splits

    ok(url, "task", "add", "refit", "--backbone", "tr", "--data", workdir / "data", *TRAIN_ARGS, "--refit")
    rows = {r["name"]: r for r in map(json.loads, ok(url, "task", "list", "--json").output.splitlines())}
    metrics = rows["refit"]["metrics"]
    best = metrics["best_epoch"]
    assert best >= 1 and metrics["refit_epochs"] == best
    assert metrics["epochs_run"] == 2 + best  # the selection run's 2 epochs, then the refit's
    assert metrics["val_top1"] == next(h["val_top1"] for h in metrics["history"] if h["epoch"] == best)

    # The same images in the same order (train then val) as one training split, trained `best` epochs, no val.
    splits = load_splits(workdir / "data")
    both = tmp_path / "both"
    both.mkdir()
    for split, samples in (("train", splits.train + splits.val), ("test", splits.test)):
        with (both / f"{split}.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "label"])
            writer.writerows((str(s.path), splits.class_names[s.label]) for s in samples)
    plain = [a if a != "2" else str(best) for a in TRAIN_ARGS]  # --epochs 2 -> --epochs best
    ok(url, "task", "add", "plain", "--backbone", "tr", "--data", both, *plain)
    engine = registry.open_registry(url)
    try:
        with Session(engine) as s:
            refit = task_tensors(registry.get_task_payload(s, "refit"), "refit")
            again = task_tensors(registry.get_task_payload(s, "plain"), "plain")
    finally:
        engine.dispose()
    assert refit.keys() == again.keys()
    for key in refit:
        torch.testing.assert_close(refit[key], again[key], msg=key)
    plain_rows = {r["name"]: r for r in map(json.loads, ok(url, "task", "list", "--json").output.splitlines())}
    assert metrics["test_top1"] == plain_rows["plain"]["metrics"]["test_top1"]


def test_refit_without_val_is_a_clean_error(url, workdir, tmp_path):
    manifest = tmp_path / "train.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows((p, p.parent.name) for p in sorted((workdir / "data" / "train").glob("*/*.jpg")))
    before = snapshot(url)
    result = invoke(url, "task", "add", "norefit", "--backbone", "tr", "--data", manifest, *TRAIN_ARGS, "--refit")
    assert_clean_error(result, "--refit needs a val/ split")
    assert snapshot(url) == before
