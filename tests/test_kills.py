"""`ssf-tasks task add` killed for real (SIGINT, SIGTERM, SIGKILL) at random moments, the final commit included:
the registry afterwards is byte for byte as before, or holds the complete new version; `task list` works and a
re-run succeeds. SIGINT and SIGTERM end with one line and no traceback."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from sqlalchemy.orm import Session

from conftest import write_image_folder
from ssf_tasks import registry

CLASSES = ["airplane", "frog", "ship"]
TRAIN = ["--epochs", "2", "--batch-size", "8", "--lr", "0.01", "--input-size", "48", "--device", "cpu"]


def cli(url: str, *args: object, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "ssf_tasks_cli", "--registry", url, *map(str, args)]
    env = {k: v for k, v in os.environ.items() if k != "SSF_TASKS_DEBUG"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A registry holding one backbone and one task, its bytes, and a dataset of JPEG files."""
    root = tmp_path_factory.mktemp("kills")
    torch.manual_seed(0)
    save_file(timm.create_model("test_resnet").state_dict(), root / "w.safetensors")
    write_image_folder(root / "data", CLASSES, {"train": 24, "val": 3, "test": 3}, size=48)
    url = f"sqlite:///{root / 'registry.db'}"
    assert (
        cli(url, "backbone", "add", "tr", "--model", "test_resnet", "--weights", root / "w.safetensors").returncode == 0
    )
    assert cli(url, "task", "add", "old", "--backbone", "tr", "--data", root / "data", *TRAIN).returncode == 0
    return root, (root / "registry.db").read_bytes()


def one_trial(root: Path, pristine: bytes, sig: signal.Signals, delay: float, trial: int) -> str:
    work = root / f"trial{trial}"
    work.mkdir()
    db = work / "registry.db"
    db.write_bytes(pristine)
    url = f"sqlite:///{db}"
    command = [sys.executable, "-m", "ssf_tasks_cli", "--registry", url, "task", "add", "new", "--backbone", "tr",
               "--data", str(root / "data"), *TRAIN]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "SSF_TASKS_DEBUG"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    time.sleep(delay)
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    listed = cli(url, "task", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    names = [json.loads(line)["name"] for line in listed.stdout.splitlines()]
    assert "Traceback" not in err
    # Ctrl-C: 130, or death by SIGINT where it came before the command's boundary (Python's own convention)
    stopped = {signal.SIGINT: (130, -2), signal.SIGTERM: (143,), signal.SIGKILL: (-9,)}[sig]
    if "new" not in names:
        assert process.returncode in stopped, (sig, process.returncode, err)
        if sig != signal.SIGKILL:
            errors = [line for line in err.splitlines() if line.startswith("error: ")]
            assert len(errors) == 1 and ("interrupted" in errors[0] or "terminated" in errors[0]), err
    else:  # finished first, or the signal came while the interpreter was exiting (Python gives the default back)
        assert process.returncode in (0, -sig.value, *stopped), (sig, process.returncode, err)
    if "new" in names:  # the complete new version, and the old task untouched
        engine = registry.open_registry(url)
        with Session(engine) as s:
            record = registry.get_task(s, "new")
            payload = registry.get_task_payload(s, "new", record.version)
            assert [r.version for r in registry.list_task_versions(s, "new")] == [1]
        engine.dispose()
        assert hashlib.sha256(payload).hexdigest() == record.payload_sha256
        assert names == ["new", "old"]
        outcome = "stored"
    else:
        assert names == ["old"]
        assert db.read_bytes() == pristine, "the registry changed although nothing was stored"
        assert not any(p.name.startswith("registry.db-") for p in work.iterdir())
        outcome = "nothing stored"
    again = cli(url, "task", "add", "new", "--backbone", "tr", "--data", root / "data", *TRAIN, "--new-version")
    assert again.returncode == 0, again.stderr
    shutil.rmtree(work)
    return outcome


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_a_killed_task_add_leaves_the_registry_whole(prepared, sig):
    root, pristine = prepared
    delay = {signal.SIGINT: 1.5, signal.SIGTERM: 2.5, signal.SIGKILL: 3.5}[sig]  # during the import or the epochs
    one_trial(root, pristine, sig, delay, trial=sig.value)


@pytest.mark.slow
def test_twenty_four_random_kills(prepared):
    root, pristine = prepared
    rng = random.Random(0)
    outcomes = []
    for trial in range(24):
        sig = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)[trial % 3]
        outcomes.append(one_trial(root, pristine, sig, rng.uniform(0.2, 12.0), trial=100 + trial))
    assert len(outcomes) == 24
