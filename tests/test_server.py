"""`ssf-tasks serve` through real HTTP on loopback: start, infer single and mixed, bad requests, hot add and remove
of tasks registered by another process, metrics, and a clean stop on SIGTERM with a request in flight."""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import timm
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from conftest import write_image_folder
from ssf_tasks_cli.main import app

CLASSES = ["airplane", "frog", "ship"]
TRAIN = ["--epochs", "1", "--batch-size", "4", "--lr", "0.01", "--input-size", "48", "--device", "cpu"]


def cli(url: str, *args) -> str:
    result = CliRunner().invoke(app, ["--registry", url, *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=[1, 2], ids=["one-process", "two-http-workers"])
def server(request, tmp_path_factory):
    """The server in one process, and with two HTTP worker processes in front of the engine process."""
    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    save_file(timm.create_model("test_vit").state_dict(), root / "w.safetensors")
    write_image_folder(root / "data", CLASSES, {"train": 3, "test": 2}, size=48)
    url = f"sqlite:///{root / 'registry.db'}"
    cli(url, "backbone", "add", "tv", "--model", "test_vit", "--weights", root / "w.safetensors")
    cli(url, "task", "add", "a", "--backbone", "tv", "--data", root / "data", *TRAIN)
    port = free_port()
    env = {**os.environ, "SSF_TASKS_REGISTRY": url}
    args = ["--port", port, "--device", "cpu", "--poll-seconds", "0.2", "--max-images", "8", "--max-body-mb", "0.05",
            "--http-workers", request.param]  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "ssf_tasks_cli.main", "serve", *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(f"{base}/v2/health/ready", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert process.poll() is None, process.communicate()[1]
        assert time.time() < deadline, "the server did not get ready"
        time.sleep(0.2)
    images = sorted((root / "data" / "test").glob("*/*.jpg"))
    yield {"base": base, "url": url, "root": root, "images": images, "process": process, "workers": request.param}
    if process.poll() is None:
        process.kill()


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def test_health_and_metadata(server):
    base = server["base"]
    assert httpx.get(f"{base}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{base}/v2/models/a/ready").status_code == 200
    assert httpx.get(f"{base}/v2/models/zzz/ready").status_code == 404
    meta = httpx.get(f"{base}/v2/models/a").json()
    assert meta["labels"] == CLASSES and meta["versions"] == ["1"]


def test_infer_raw_json_and_mixed_agree_with_predict(server, tmp_path):
    base, images = server["base"], server["images"]
    raw = [httpx.post(f"{base}/v2/models/a/infer?top_k=2", content=p.read_bytes(), headers={"content-type": "image/jpeg"})
           for p in images]  # fmt: skip
    assert all(r.status_code == 200 for r in raw), raw[0].text
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(images)], "data": [b64(p) for p in images]}],
            "parameters": {"top_k": 2}}  # fmt: skip
    batch = httpx.post(f"{base}/v2/models/a/infer", json=body).json()["outputs"]
    mixed = httpx.post(f"{base}/v2/infer", json={"inputs": [{"task": "a", "data": b64(p)} for p in images]}).json()
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,task\n" + "".join(f"{p},a\n" for p in images))
    cli(server["url"], "predict", manifest, "--out", tmp_path / "p.csv", "--device", "cpu")
    rows = (tmp_path / "p.csv").read_text().splitlines()[1:]
    expected = [(row.split(",")[2], float(row.split(",")[3])) for row in rows]
    for single, many, one_of_mixed, (label, score) in zip(raw, batch, mixed["outputs"], expected, strict=True):
        single = single.json()["outputs"][0]
        assert single["label"] == many["label"] == one_of_mixed["label"] == label
        assert len(single["labels"]) == 2
        assert abs(single["score"] - score) < 1e-5 and abs(one_of_mixed["score"] - score) < 1e-5


def test_auto_requests_name_the_routed_task_and_answer_as_it_does(server):
    base, images = server["base"], server["images"]
    known = httpx.post(f"{base}/v2/infer", json={"inputs": [{"task": "a", "data": b64(p)} for p in images]})
    auto = httpx.post(f"{base}/v2/infer", json={"inputs": [{"task": "auto", "data": b64(p)} for p in images]})
    raw = httpx.post(
        f"{base}/v2/models/auto/infer", content=images[0].read_bytes(), headers={"content-type": "image/jpeg"}
    )
    assert (known.status_code, auto.status_code, raw.status_code) == (200, 200, 200), auto.text
    assert raw.json()["model_version"] == "routed" and raw.json()["outputs"][0]["task"] in ("a", "none")
    for given, routed in zip(known.json()["outputs"], auto.json()["outputs"], strict=True):
        assert "route_score" not in given and isinstance(routed["route_score"], float)
        assert routed["task"] in ("a", "none")
        if routed["task"] == "a":
            assert routed["label"] == given["label"] and abs(routed["score"] - given["score"]) < 1e-5
        else:
            assert routed["label"] is None and routed["labels"] == []
    assert sum(o["task"] == "a" for o in auto.json()["outputs"]) >= len(images) - 1


BAD_REQUESTS = [
    ("post", "/v2/models/nope/infer", {"content": b"x", "headers": {"content-type": "image/jpeg"}}, 404, "unknown task"),
    ("post", "/v2/models/a/infer", {"content": b"not an image", "headers": {"content-type": "image/jpeg"}}, 400, "cannot read image"),
    ("post", "/v2/models/a/infer", {"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "content type"),
    ("post", "/v2/models/a/infer", {"content": b"x" * 60_000, "headers": {"content-type": "image/jpeg"}}, 413, "over the limit"),
    ("post", "/v2/models/a/infer", {"content": b"{", "headers": {"content-type": "application/json"}}, 400, "invalid JSON"),
    ("post", "/v2/models/a/infer", {"json": {"inputs": [{"data": ["%%%"]}]}}, 400, "invalid base64"),
    ("post", "/v2/models/a/infer", {"json": {"inputs": [{"data": ["aGk="] * 9}]}}, 413, "at most 8"),
    ("post", "/v2/models/a/infer", {"json": {"inputs": [{"data": []}]}}, 400, "no images"),
    ("post", "/v2/infer", {"json": {"inputs": [{"task": "a"}]}}, 400, "expected a base64 string"),
    ("post", "/v2/infer", {"json": {"inputs": [{"task": "zzz", "data": "aGk="}]}}, 404, "unknown task"),
    ("post", "/v2/infer", {"json": {"inputs": [], "top_k": 1}}, 400, "no images"),
    ("post", "/v2/infer", {"json": {"inputs": [{"task": "a", "data": "aGk="}], "top_k": 0}}, 400, "top_k"),
]  # fmt: skip


@pytest.mark.parametrize("method, path, kwargs, status, needle", BAD_REQUESTS)
def test_bad_requests_get_a_4xx_with_a_message(server, method, path, kwargs, status, needle):
    response = getattr(httpx, method)(server["base"] + path, **kwargs)
    assert response.status_code == status, response.text
    assert needle in response.json()["error"]


def test_tasks_registered_or_removed_elsewhere_are_picked_up(server):
    base, url, root, images = server["base"], server["url"], server["root"], server["images"]
    before = httpx.post(f"{base}/v2/infer", json={"inputs": [{"task": "a", "data": b64(p)} for p in images]}).json()
    cli(url, "task", "add", "b", "--backbone", "tv", "--data", root / "data", *TRAIN, "--seed", "3")
    registered = time.time()
    while httpx.get(f"{base}/v2/models/b/ready").status_code != 200:
        assert time.time() - registered < 5, "task b was not served within 5 s of its registration"
        time.sleep(0.05)
    both = [{"task": "ab"[i % 2], "data": b64(p)} for i, p in enumerate(images)]
    after = httpx.post(f"{base}/v2/infer", json={"inputs": both}).json()["outputs"]
    assert [o["task"] for o in after] == ["ab"[i % 2] for i in range(len(images))]
    for old, new in zip(before["outputs"][::2], after[::2], strict=True):  # task a answers exactly as before
        assert (old["label"], old["score"]) == (new["label"], new["score"])
    cli(url, "task", "rm", "b")
    deadline = time.time() + 5
    while httpx.get(f"{base}/v2/models/b/ready").status_code != 404:
        assert time.time() < deadline, "a removed task was still served"
        time.sleep(0.05)
    metrics = httpx.get(f"{base}/metrics").text
    assert 'ssf_requests_total{status="200",task="mixed"}' in metrics
    assert (
        "ssf_batch_size_bucket" in metrics and "ssf_queue_depth" in metrics and 'ssf_images_total{task="a"}' in metrics
    )


def children(pid: int) -> set[int]:
    return {int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


@pytest.mark.parametrize("server", [2], ids=["two-http-workers"], indirect=True)
def test_a_killed_http_worker_is_replaced_and_the_others_keep_answering(server):
    base, process, images = server["base"], server["process"], server["images"]
    workers = {pid for pid in children(process.pid) if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()}
    assert len(workers) == 2
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    body = {"inputs": [{"task": "a", "data": b64(images[0])}]}
    deadline = time.time() + 60
    while not (children(process.pid) - workers):  # a new worker replaces the killed one
        assert time.time() < deadline, "the killed HTTP worker was not replaced"
        time.sleep(0.2)
    ok = 0
    while ok < 10:  # the survivor answers meanwhile; the new one once it is up
        try:
            ok += httpx.post(f"{base}/v2/infer", json=body, timeout=30).status_code == 200
        except httpx.TransportError:
            assert time.time() < deadline
    assert process.poll() is None


def test_sigterm_finishes_the_request_in_flight_then_exits_cleanly(server):
    base, process, images = server["base"], server["process"], server["images"]
    answers = []
    body = {"inputs": [{"task": "a", "data": b64(p)} for p in images]}
    sender = threading.Thread(target=lambda: answers.append(httpx.post(f"{base}/v2/infer", json=body, timeout=30)))
    sender.start()
    time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    sender.join()
    _, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert answers and answers[0].status_code in (200, 503), answers
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "stopped"
