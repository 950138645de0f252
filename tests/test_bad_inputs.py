"""Bad input, in one place: each case gets a one-line message naming the problem, a non-zero exit code (or a 4xx, or
an ``SSFTasksError`` from Python), no traceback unless ``SSF_TASKS_DEBUG`` is set, and leaves the registry as it was.

Cases are built on a registry holding one backbone (``tr``) and one trained task (``cifar``), copied for each case.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_cli import (
    TRAIN_ARGS,
    _test_images,
    assert_clean_error,
    invoke,
    snapshot,
    trained,
    url,
    workdir,
    write_manifest,
)

__all__ = ["trained", "url", "workdir"]

Case = Callable[[Path, Path], tuple[list, str]]  # (workdir, tmp_path) -> (CLI arguments, text the error must hold)


def _then(_done: object, value: object) -> object:
    """``value``, once the side effect written before it (a file) is done."""
    return value


def _data(workdir: Path, tmp: Path, change: Callable[[Path], object]) -> Path:
    data = tmp / "data"
    shutil.copytree(workdir / "data", data)
    change(data)
    return data


def _add(data: Path, *extra: str) -> list:
    return ["task", "add", "t", "--backbone", "tr", "--data", data, *TRAIN_ARGS, *extra]


def _predict(tmp: Path, rows: list[tuple[object, str]], *extra: str) -> list:
    return ["predict", write_manifest(tmp / "m.csv", rows), "--out", tmp / "p.csv", *extra]


def _image(tmp: Path, name: str, make: Callable[[], Image.Image], **save) -> Path:
    path = tmp / name
    make().save(path, **save)
    return path


def _task_file(workdir: Path, tmp: Path, edit: Callable[[dict, dict], None]) -> Path:
    """The task ``cifar`` written to a file (by the CLI), then changed by ``edit(tensors, metadata)``."""
    source = tmp / "good.st"
    assert invoke(f"sqlite:///{tmp / 'registry.db'}", "task", "export-file", "cifar", "--out", source).exit_code == 0
    with safe_open(str(source), framework="pt") as handle:
        metadata = dict(handle.metadata())
    tensors = load_file(source)
    edit(tensors, metadata)
    out = tmp / "bad.st"
    save_file(tensors, out, metadata=metadata)
    return out


def _resign(tensors: dict, metadata: dict) -> None:
    """Give the task file's record the sha256 of its (changed) tensors: only the content check can refuse it."""
    from ssf_tasks.taskfiles import TASK_FILE_METADATA_KEY, task_payload

    record = json.loads(metadata[TASK_FILE_METADATA_KEY])
    record["payload_sha256"] = hashlib.sha256(task_payload(tensors)).hexdigest()
    metadata[TASK_FILE_METADATA_KEY] = json.dumps(record)


def _nan(tensors: dict, metadata: dict) -> None:
    key = next(k for k in tensors if k.endswith("ssf_scale"))
    tensors[key][0] = float("nan")
    _resign(tensors, metadata)


def _int_dtype(tensors: dict, metadata: dict) -> None:
    key = next(k for k in tensors if k.endswith("ssf_shift"))
    tensors[key] = tensors[key].round().to(torch.int32)
    _resign(tensors, metadata)


def _wrong_shape(tensors: dict, metadata: dict) -> None:
    key = next(k for k in tensors if k.endswith("ssf_scale"))
    tensors[key] = torch.cat([tensors[key], tensors[key][:1]])
    _resign(tensors, metadata)


def _tampered(tensors: dict, metadata: dict) -> None:
    key = next(iter(tensors))
    tensors[key] = tensors[key] + 1  # the sha256 in the record no longer matches


def _other_fingerprint(tensors: dict, metadata: dict) -> None:
    from ssf_tasks.taskfiles import TASK_FILE_METADATA_KEY

    record = json.loads(metadata[TASK_FILE_METADATA_KEY])
    record["backbone_fingerprint"] = "0" * 64
    metadata[TASK_FILE_METADATA_KEY] = json.dumps(record)


def _wrong_classes(tensors: dict, metadata: dict) -> None:
    from ssf_tasks.taskfiles import TASK_FILE_METADATA_KEY

    record = json.loads(metadata[TASK_FILE_METADATA_KEY])
    record["class_names"] = [*record["class_names"], "extra"]
    record["name"] = "renamed"
    metadata[TASK_FILE_METADATA_KEY] = json.dumps(record)


def _gif(tmp: Path) -> Path:
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "blue")]
    frames[0].save(tmp / "anim.gif", save_all=True, append_images=frames[1:])
    return tmp / "anim.gif"


def _truncated(workdir: Path, tmp: Path) -> Path:
    good = _test_images(workdir)[0].read_bytes()
    (tmp / "cut.jpg").write_bytes(good[: len(good) // 3])
    return tmp / "cut.jpg"


CLI_CASES: dict[str, Case] = {
    # datasets for task add
    "data folder missing": lambda w, t: (_add(t / "nowhere"), "nowhere"),
    "data folder empty": lambda w, t: ((t / "empty").mkdir() or _add(t / "empty"), "empty"),
    "class folder empty": lambda w, t: (_add(_data(w, t, lambda d: (d / "train" / "zebra").mkdir())), "zebra"),
    "corrupt training image": lambda w, t: (
        _add(_data(w, t, lambda d: (d / "train" / "frog" / "broken.jpg").write_bytes(b"not a jpeg"))), "broken.jpg"),
    "truncated training image": lambda w, t: (
        _add(_data(w, t, lambda d: shutil.copy(_truncated(w, t), d / "train" / "frog" / "cut.jpg"))), "cut.jpg"),
    "non-image file in a split": lambda w, t: (
        _add(_data(w, t, lambda d: (d / "val" / "ship" / "notes.txt").write_text("hi"))), "notes.txt"),
    "data manifest with wrong columns": lambda w, t: (
        _then((t / "d.csv").write_text("file,class\na.jpg,x\n"), _add(t / "d.csv")), "d.csv"),
    "data manifest naming a missing image": lambda w, t: (
        _then((t / "d.csv").write_text(f"path,label\n{t / 'gone.jpg'},x\n"), _add(t / "d.csv")), "gone.jpg"),
    # names and numbers
    "task name with spaces": lambda w, t: (["task", "add", "Bad Name!", "--backbone", "tr", "--data", w / "data"],
                                           "invalid task name"),
    "task name too long": lambda w, t: (["task", "add", "x" * 65, "--backbone", "tr", "--data", w / "data"], "x" * 65),
    "task name escaping its folder": lambda w, t: (["task", "add", "../etc", "--backbone", "tr", "--data", w / "data"],
                                                   "invalid task name"),
    "unknown backbone": lambda w, t: (["task", "add", "t", "--backbone", "nope", "--data", w / "data"],
                                      "unknown backbone 'nope'"),
    "duplicate task": lambda w, t: (["task", "add", "cifar", "--backbone", "tr", "--data", w / "data"],
                                    "--new-version"),
    "unknown init-from task": lambda w, t: (_add(w / "data", "--init-from", "nope"), "unknown task 'nope'"),
    "negative learning rate": lambda w, t: (_add(w / "data", "--lr", "-1"), "lr"),
    "NaN loss": lambda w, t: (["task", "add", "t", "--backbone", "tr", "--data", w / "data", "--epochs", "1",
                               "--batch-size", "3", "--lr", "1e30", "--input-size", "64", "--device", "cpu"],
                              "loss became"),
    "unknown task to show": lambda w, t: (["task", "show", "nope"], "unknown task 'nope'"),
    "unknown task to remove": lambda w, t: (["task", "rm", "nope"], "unknown task 'nope'"),
    "unknown version to remove": lambda w, t: (["task", "rm", "cifar", "--version", "9"], "version"),
    "unknown task to evaluate": lambda w, t: (["task", "eval", "nope", "--data", w / "data"], "unknown task 'nope'"),
    "evaluation data with a class the task lacks": lambda w, t: (
        ["task", "eval", "cifar", "--data", _data(w, t, lambda d: shutil.copytree(d / "test" / "frog",
                                                                                 d / "test" / "zebra"))], "zebra"),
    "unknown task to export": lambda w, t: (["export", "nope", "--out", t / "x"], "unknown task 'nope'"),
    "export onto a file": lambda w, t: (_then((t / "x").write_text(""), ["export", "cifar", "--out", t / "x"]), "x"),
    # backbones
    "duplicate backbone": lambda w, t: (["backbone", "add", "tr", "--model", "test_resnet", "--weights",
                                         w / "w.safetensors"], "already exists"),
    "unknown timm model": lambda w, t: (["backbone", "add", "b2", "--model", "no_such_model", "--weights",
                                         w / "w.safetensors"], "no_such_model"),
    "missing weights file": lambda w, t: (["backbone", "add", "b2", "--model", "test_resnet", "--weights",
                                           t / "missing.pth"], "missing.pth"),
    "weights of another architecture": lambda w, t: (["backbone", "add", "b2", "--model", "test_vit", "--weights",
                                                      w / "w.safetensors"], "does not fit"),
    "corrupt weights file": lambda w, t: (
        _then((t / "junk.safetensors").write_bytes(b"\x00" * 64),
              ["backbone", "add", "b2", "--model", "test_resnet", "--weights", t / "junk.safetensors"]),
        "junk.safetensors",
    ),
    # prediction manifests and images
    "manifest missing": lambda w, t: (["predict", t / "none.csv", "--out", t / "p.csv"], "none.csv"),
    "manifest with wrong columns": lambda w, t: (
        (_then((t / "m.csv").write_text("path,label\na.jpg,x\n"), ["predict", t / "m.csv", "--out", t / "p.csv"])), "task"),
    "manifest with no rows": lambda w, t: (
        (_then((t / "m.csv").write_text("path,task\n"), ["predict", t / "m.csv", "--out", t / "p.csv"])), "no rows"),
    "manifest naming an unknown task": lambda w, t: (
        _predict(t, [(_test_images(w)[0], "cifar"), (_test_images(w)[1], "nope")]), "row 2"),
    "manifest naming a missing image": lambda w, t: (_predict(t, [(t / "gone.jpg", "cifar")]), "gone.jpg"),
    "corrupt image to predict": lambda w, t: (
        _then((t / "bad.png").write_bytes(b"\x89PNG not really"), _predict(t, [(t / "bad.png", "cifar")])), "bad.png"),
    "truncated image to predict": lambda w, t: (_predict(t, [(_truncated(w, t), "cifar")]), "cut.jpg"),
    "folder to predict without --task": lambda w, t: (["predict", w / "data", "--out", t / "p.csv"], "--task"),
    "folder to predict with no images": lambda w, t: (
        (t / "nothing").mkdir() or ["predict", t / "nothing", "--task", "cifar", "--out", t / "p.csv"], "no image"),
    # task files
    "task file missing": lambda w, t: (["task", "import-file", t / "nothing.st"], "nothing.st"),
    "task file that is not safetensors": lambda w, t: (
        _then((t / "junk.st").write_bytes(b"junk"), ["task", "import-file", t / "junk.st"]), "junk.st"),
    "weights file given as a task file": lambda w, t: (["task", "import-file", w / "w.safetensors"],
                                                       "not an ssf-tasks task file"),
    "tampered task file": lambda w, t: (["task", "import-file", _task_file(w, t, _tampered)], "damaged"),
    "task file with NaN values": lambda w, t: (["task", "import-file", _task_file(w, t, _nan)], "non-finite"),
    "task file with integer tensors": lambda w, t: (["task", "import-file", _task_file(w, t, _int_dtype)], "dtype"),
    "task file with a wrong shape": lambda w, t: (["task", "import-file", _task_file(w, t, _wrong_shape)], "shape"),
    "task file of other weights": lambda w, t: (["task", "import-file", _task_file(w, t, _other_fingerprint)],
                                                "fingerprint"),
    "task file whose head does not match its classes": lambda w, t: (
        ["task", "import-file", _task_file(w, t, _wrong_classes)], "classes"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli(url, workdir, tmp_path, case):
    args, needle = CLI_CASES[case](workdir, tmp_path)
    before = snapshot(url)
    assert_clean_error(invoke(url, *args), needle)
    assert snapshot(url) == before
    assert not (tmp_path / "p.csv").exists()


REGISTRY_CASES = {
    "unknown URL scheme": ("foo://nowhere/db", "foo"),
    "registry path that is a folder": ("sqlite:///{tmp}", "{tmp}"),
    "registry in an unwritable place": ("sqlite:////proc/ssf-tasks-test/registry.db", "/proc/ssf-tasks-test"),
    "corrupt registry file": ("sqlite:///{tmp}/junk.db", "junk.db"),
    "registry of a newer schema": ("sqlite:///{tmp}/newer.db", "schema version 99"),
}


@pytest.mark.parametrize("case", sorted(REGISTRY_CASES))
def test_registry_urls(url, tmp_path, case):
    shutil.copy(url.removeprefix("sqlite:///"), tmp_path / "newer.db")
    with sqlite3.connect(tmp_path / "newer.db") as conn:
        conn.execute("UPDATE schema_info SET schema_version = 99")
    (tmp_path / "junk.db").write_bytes(b"this is not a database" * 100)
    files = _files(tmp_path)
    registry_url, needle = (s.format(tmp=tmp_path) for s in REGISTRY_CASES[case])
    assert_clean_error(invoke(registry_url, "task", "list"), needle)
    assert _files(tmp_path) == files


def _files(folder: Path) -> dict[str, bytes]:
    """The bytes of every file but SQLite's shared-memory index (``-shm``), which any reader rewrites."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.name.endswith("-shm")}


def test_an_input_size_the_backbone_cannot_take_is_refused_before_training(url, workdir, tmp_path):
    """A ViT built for 160x160 images only (test_vit3) and --input-size 64: one line naming both sizes, nothing stored."""
    import timm

    torch.manual_seed(0)
    save_file(timm.create_model("test_vit3").state_dict(), tmp_path / "vit.safetensors")
    added = invoke(url, "backbone", "add", "vit", "--model", "test_vit3", "--weights", tmp_path / "vit.safetensors")
    assert added.exit_code == 0, added.output
    before = snapshot(url)
    args = ["task", "add", "t", "--backbone", "vit", "--data", workdir / "data", "--input-size", "64"]
    assert_clean_error(invoke(url, *args, "--device", "cpu"), "does not take 64x64 inputs", "its 160x160")
    assert snapshot(url) == before


def test_debug_env_shows_the_traceback(url):
    result = invoke(url, "task", "show", "nope", env={"SSF_TASKS_DEBUG": "1"})
    assert result.exit_code != 0 and type(result.exception).__name__ == "TaskNotFoundError"


# --------------------------------------------------------------------------------------------- images
@pytest.mark.parametrize(
    "make",
    [
        lambda t: _image(t, "one.png", lambda: Image.new("RGB", (1, 1), "red")),
        lambda t: _image(t, "cmyk.jpg", lambda: Image.new("CMYK", (30, 20), (0, 80, 160, 10))),
        lambda t: _image(t, "deep.png", lambda: Image.new("I;16", (30, 30), 4000)),
        lambda t: _image(t, "alpha.png", lambda: Image.new("RGBA", (30, 30), (1, 2, 3, 4))),
        lambda t: _image(t, "palette.gif", lambda: Image.new("P", (30, 30), 3)),
        _gif,
    ],
    ids=["1-pixel", "CMYK", "16-bit", "alpha", "palette", "animated"],
)
def test_unusual_images_are_predicted_like_training_reads_them(url, tmp_path, make):
    """Odd but valid images are not bad input: they are converted to RGB as training converts them."""
    path = make(tmp_path)
    result = invoke(url, *_predict(tmp_path, [(path, "cifar")]))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p.csv").read_text().splitlines()[1].split(",")[2] in ("airplane", "frog", "ship")


def test_huge_image_is_refused_without_decoding(url, tmp_path, monkeypatch):
    monkeypatch.setattr("ssf_tasks.image_input.MAX_PIXELS", 100 * 100)
    path = _image(tmp_path, "huge.png", lambda: Image.new("RGB", (200, 200)))
    assert_clean_error(invoke(url, *_predict(tmp_path, [(path, "cifar")])), "huge.png", "too large")


# ---------------------------------------------------------------------------------------------- Python API
def _api_cases():
    import timm

    from ssf_tasks import MultiTaskSSF

    def model():
        m = MultiTaskSSF(timm.create_model("test_vit", num_classes=0))
        m.add_task("a", 3)
        return m

    images = torch.randn(2, 3, 160, 160)
    return {
        "not a timm model": lambda: MultiTaskSSF(torch.nn.Linear(3, 3)),
        "backbone with a classifier": lambda: MultiTaskSSF(timm.create_model("test_vit", num_classes=5)),
        "pattern matching nothing": lambda: MultiTaskSSF(timm.create_model("test_vit", num_classes=0),
                                                         include=["no.such.*"]),
        "unknown task name": lambda: model()(images, ["a", "b"]),
        "task list of the wrong length": lambda: model()(images, ["a"]),
        "task index out of range": lambda: model()(images, torch.tensor([0, 7])),
        "duplicate task": lambda: model().add_task("a", 2),
        "zero classes": lambda: model().add_task("b", 0),
        "task state of another backbone": lambda: model().load_task("b", {"head.weight": torch.zeros(2, 3)}),
        "fold of an unknown task": lambda: model().fold("zzz"),
    }  # fmt: skip


@pytest.mark.parametrize("case", sorted(_api_cases()))
def test_python_api(case):
    from ssf_tasks import SSFTasksError

    with pytest.raises(SSFTasksError) as caught:
        _api_cases()[case]()
    message = str(caught.value)
    assert message and "\n" not in message


def test_the_matrix_is_at_least_forty_inputs():
    from test_server import BAD_REQUESTS

    assert len(CLI_CASES) + len(REGISTRY_CASES) + len(_api_cases()) + len(BAD_REQUESTS) >= 40
