"""What a user gets end to end: ``predict`` from JPEG files and ``serve`` under concurrent clients, each timed beside
the mixed-task forward's own throughput in the same run (same card, same registry, same tasks).

The registry is built for the run: a backbone (random weights: speed does not depend on them) and ``tasks`` tasks
with random γ/β and heads, registered as ``task add`` would store them; the images are real 224-px JPEG files.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

__all__ = ["bench_predict", "bench_serve", "make_registry"]

Row = dict[str, Any]


def make_registry(folder: Path, model: str, tasks: int, images: int, classes: int = 10) -> tuple[str, list[Path]]:
    """A registry of ``tasks`` tasks on one backbone, and ``images`` JPEG files with a mixed manifest."""
    import numpy as np
    import timm
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from ssf_tasks import registry
    from ssf_tasks.catalog import add_backbone, load_backbone
    from ssf_tasks.config import TaskRecord
    from ssf_tasks.model import MultiTaskSSF
    from ssf_tasks.taskfiles import task_payload

    folder.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{folder / 'registry.db'}"
    engine = registry.open_registry(url)
    torch.manual_seed(0)
    weights = folder / "weights.safetensors"
    save_file(timm.create_model(model).state_dict(), weights)
    backbone = add_backbone(engine, "bench", model, weights)
    ssf = MultiTaskSSF(load_backbone(backbone))
    fp = backbone.fingerprint
    names = [f"task{i:03d}" for i in range(tasks)]
    for name in names:
        ssf.add_task(name, classes)
        record = TaskRecord(
            name=name,
            backbone="bench",
            backbone_fingerprint=fp,
            class_names=[f"c{k}" for k in range(classes)],
        )
        with registry.transaction(engine, "bench") as s:
            registry.add_task_version(s, record, task_payload(ssf.task_state_dict(name)), new_version=False)
        ssf.remove_task(name)
    engine.dispose()

    rng = np.random.default_rng(0)
    image_dir = folder / "images"
    image_dir.mkdir(exist_ok=True)

    def write(i: int) -> Path:  # a smooth picture (a camera photo's JPEG size, not noise's)
        small = rng.integers(0, 256, (14, 14, 3), dtype=np.uint8)
        path = image_dir / f"{i:06d}.jpg"
        Image.fromarray(small).resize((224, 224), Image.BICUBIC).save(path, quality=90)
        return path

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        paths = list(pool.map(write, range(images)))
    with open(folder / "manifest.csv", "w") as handle:
        handle.write("path,task\n")
        for i, path in enumerate(paths):
            handle.write(f"{path},{names[i % len(names)]}\n")
    return url, paths


def _forward_rate(url: str, batch: int, precision: str, device: str, repeats: int = 20) -> Row:
    """Images/s of the Predictor's compiled mixed-task forward alone, on uint8 images already on the GPU."""
    import torch

    from ssf_tasks import registry
    from ssf_tasks.engine import Predictor

    engine = registry.open_registry(url)
    predictor = Predictor(engine, device=device, precision=precision, compile=device == "cuda")
    state = predictor._state
    group = next(iter(state.groups.values()))
    names = sorted(state.records)
    tasks = [names[i % len(names)] for i in range(batch)]
    images = torch.randint(0, 256, (batch, *group.input_hw, 3), dtype=torch.uint8, device=device)
    rows = [state.rows[t] for t in tasks]
    run = lambda: predictor._logits(group, images, rows, batch, compiled=device == "cuda")  # noqa: E731
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    for _ in range(3):
        run()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    predictor.close()
    engine.dispose()
    median = statistics.median(times)
    return {
        "what": f"mixed-task forward, batch {batch}, {len(names)} tasks",
        "ms": median * 1e3,
        "img_s": batch / median,
    }


def bench_predict(
    folder: Path, model: str, tasks: int, images: int, batch: int, precision: str, device: str = "cuda"
) -> list[Row]:
    """``predict`` from JPEG files: the Python engine (warm) and the CLI command (cold, as a user runs it)."""
    from ssf_tasks import registry
    from ssf_tasks.data import read_predict_manifest
    from ssf_tasks.engine import Predictor

    url, _ = make_registry(folder, model, tasks, images)
    rows = [_forward_rate(url, batch, precision, device)]
    items = read_predict_manifest(folder / "manifest.csv")
    engine = registry.open_registry(url)
    started = time.perf_counter()
    predictor = Predictor(
        engine, sorted({t for _, t in items}), device=device, precision=precision, compile=device == "cuda"
    )
    loaded = time.perf_counter()
    predictor.predict(items[: batch * 2], batch_size=batch)  # compiles
    compiled = time.perf_counter()
    rates = []
    for _ in range(3):
        start = time.perf_counter()
        predictor.predict(items, batch_size=batch)
        rates.append(len(items) / (time.perf_counter() - start))
    rows.append({
        "what": f"Predictor.predict, {len(items)} JPEG files, batch {batch}, warm",
        "img_s": statistics.median(rates),
        "load_s": loaded - started,
        "first_call_s": compiled - loaded,
    })  # fmt: skip
    predictor.close()
    engine.dispose()
    for threads in (None,):
        command = [sys.executable, "-m", "ssf_tasks_cli.main", "--registry", url, "predict",
                   str(folder / "manifest.csv"),
                   "--out", str(folder / "predictions.csv"), "--batch-size", str(batch), "--precision", precision,
                   "--device", device]  # fmt: skip
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-2000:])
        rows.append({
            "what": f"ssf-tasks predict (command, cold: import, load, compile, decode, write), {len(items)} files",
            "img_s": len(items) / seconds,
            "seconds": seconds,
            "threads": threads or os.cpu_count(),
        })  # fmt: skip
    help_start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ssf_tasks_cli.main", "--help"], capture_output=True, check=True)
    rows.append({"what": "ssf-tasks --help", "seconds": time.perf_counter() - help_start})
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _client_process(base: str, bodies: list[tuple[str, bytes]], clients: int, seconds: float, rate: float,
                    per_request: int, out: multiprocessing.Queue) -> None:  # fmt: skip
    """``clients`` concurrent connections sending JPEGs of random tasks; ``rate`` > 0 paces each one (requests/s)."""
    import base64

    import httpx

    async def client(index: int, latencies: list[float], failures: list[int]) -> None:
        rng = random.Random(index)
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            end = time.perf_counter() + seconds
            next_at = time.perf_counter() + rng.random() / rate if rate else 0.0
            while time.perf_counter() < end:
                if rate:
                    await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                    next_at += rng.expovariate(rate)
                picks = [bodies[rng.randrange(len(bodies))] for _ in range(per_request)]
                start = time.perf_counter()
                if per_request == 1:
                    task, jpeg = picks[0]
                    response = await http.post(f"/v2/models/{task}/infer", content=jpeg,
                                               headers={"content-type": "image/jpeg"})  # fmt: skip
                else:
                    inputs = [{"task": t, "data": base64.b64encode(j).decode()} for t, j in picks]
                    response = await http.post("/v2/infer", json={"inputs": inputs})
                latencies.append(time.perf_counter() - start)
                if response.status_code != 200:
                    failures.append(response.status_code)

    async def main() -> tuple[list[float], list[int]]:
        latencies: list[float] = []
        failures: list[int] = []
        await asyncio.gather(*(client(i, latencies, failures) for i in range(clients)))
        return latencies, failures

    out.put(asyncio.run(main()))


def _load(base: str, bodies, clients: int, processes: int, seconds: float, rate: float, per_request: int) -> Row:
    out: multiprocessing.Queue = multiprocessing.Queue()
    processes = min(processes, clients)
    shares = [clients // processes + (i < clients % processes) for i in range(processes)]  # all ``clients``, spread
    workers = [multiprocessing.Process(target=_client_process, args=(base, bodies, n, seconds, rate, per_request, out))
               for n in shares]  # fmt: skip
    for w in workers:
        w.start()
    latencies, failures = [], []
    for _ in workers:
        lat, fail = out.get()
        latencies += lat
        failures += fail
    for w in workers:
        w.join()
    latencies.sort()
    count = len(latencies)
    return {
        "clients": sum(shares),
        "images_per_request": per_request,
        "paced_requests_s_per_client": rate or None,
        "img_s": count * per_request / seconds,
        "p50_ms": latencies[count // 2] * 1e3 if count else None,
        "p99_ms": latencies[min(count - 1, int(count * 0.99))] * 1e3 if count else None,
        "failed": len(failures),
    }


def bench_serve(
    folder: Path,
    model: str,
    tasks: int,
    batch: int,
    precision: str,
    clients: int,
    seconds: float,
    processes: int = 8,
    per_request: tuple[int, ...] = (1, 8),
    device: str = "cuda",
    http_workers: tuple[int, ...] = (1, 8),
) -> list[Row]:
    """``ssf-tasks serve`` under ``clients`` concurrent clients over loopback (real JPEGs of many tasks): throughput and
    p50/p99 at full load, p99 at half that load, and how soon a task registered meanwhile answers; one server per
    entry of ``http_workers``, one after another in this run."""
    url, paths = make_registry(folder, model, tasks, 512)
    rows = [_forward_rate(url, batch, precision, device)]
    names = [f"task{i:03d}" for i in range(tasks)]
    bodies = [(names[i % tasks], p.read_bytes()) for i, p in enumerate(paths)]
    for workers in http_workers:
        rows += _serve_rows(url, names, bodies, batch, precision, clients, seconds, processes, per_request, device,
                            workers)  # fmt: skip
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def _serve_rows(url, names, bodies, batch, precision, clients, seconds, processes, per_request, device, workers):
    """One server with ``workers`` HTTP worker processes under load; see :func:`bench_serve`."""
    import httpx

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "ssf_tasks_cli.main", "--registry", url, "serve", "--port", str(port),
               "--device", device, "--precision", precision, "--max-batch-size", str(batch), "--max-delay-ms", "2",
               "--poll-seconds", "0.5", "--http-workers", str(workers)]  # fmt: skip
    rows: list[Row] = []
    label = f"{workers} HTTP worker(s)"
    started = time.perf_counter()
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        while True:
            try:
                if httpx.get(f"{base}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                raise RuntimeError(server.stderr.read()[-2000:])
            time.sleep(0.5)
        rows.append({"what": f"serve, {label}: start-up to ready (load, compile and warm the batch buckets)",
                     "seconds": time.perf_counter() - started})  # fmt: skip
        _load(base, bodies, 8, 2, 3, 0, 1)  # warm the connections and the decode threads
        for k in per_request:
            full = _load(base, bodies, clients, processes, seconds, 0, k)
            rows.append({"what": f"serve, {label}, {clients} clients, {k} image(s) per request, full load", **full})
            per_client = full["img_s"] / 2 / clients / k
            half = _load(base, bodies, clients, processes, seconds, per_client, k)
            rows.append({"what": f"serve, {label}, {clients} clients, {k} image(s) per request, half load", **half})
        # A task registered while serving: seconds until it answers.
        from ssf_tasks import registry
        from ssf_tasks.config import TaskRecord
        from ssf_tasks.taskfiles import task_payload, task_tensors

        engine = registry.open_registry(url)
        from sqlalchemy.orm import Session

        with Session(engine) as s:
            source = registry.get_task(s, names[0])
            payload = registry.get_task_payload(s, names[0])
        fresh = f"fresh{workers}"
        record = TaskRecord(name=fresh, backbone=source.backbone, backbone_fingerprint=source.backbone_fingerprint,
                            class_names=source.class_names)  # fmt: skip
        registered = time.perf_counter()
        with registry.transaction(engine, "bench") as s:
            registry.add_task_version(s, record, task_payload(task_tensors(payload, names[0])), new_version=False)
        while httpx.get(f"{base}/v2/models/{fresh}/ready").status_code != 200:
            time.sleep(0.02)
        answered = httpx.post(f"{base}/v2/models/{fresh}/infer", content=bodies[0][1],
                              headers={"content-type": "image/jpeg"}, timeout=300)  # fmt: skip
        rows.append({"what": f"serve, {label}: a task registered while serving, registration to first answer",
                     "seconds": time.perf_counter() - registered, "status": answered.status_code})  # fmt: skip
        engine.dispose()
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
    return rows
