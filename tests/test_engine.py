"""The application layer from Python, without the CLI: train and store, the Predictor (input path, mixed batches,
refresh while running), export."""

from __future__ import annotations

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from conftest import write_image_folder
from ssf_tasks import training_job
from ssf_tasks.catalog import add_backbone, list_tasks, remove_task
from ssf_tasks.config import TrainConfig
from ssf_tasks.data import build_transform
from ssf_tasks.engine import Predictor, load_tasks
from ssf_tasks.errors import DataError, DuplicateTaskError, RegistryError, SSFTasksError, TaskNotFoundError
from ssf_tasks.export import export_task
from ssf_tasks.image_input import split_transform
from ssf_tasks.registry import open_registry
from ssf_tasks.training_job import train_and_store

CLASSES = ["airplane", "frog", "ship"]
CONFIG = TrainConfig(epochs=1, batch_size=4, lr=1e-2, input_size=64, device="cpu")


@pytest.fixture
def engine(tmp_path):
    torch.manual_seed(0)
    save_file(timm.create_model("test_resnet").state_dict(), tmp_path / "w.safetensors")
    write_image_folder(tmp_path / "data", CLASSES, {"train": 4, "test": 2})
    engine = open_registry(f"sqlite:///{tmp_path / 'registry.db'}")
    add_backbone(engine, "tr", "test_resnet", tmp_path / "w.safetensors")
    yield engine
    engine.dispose()


def test_python_flow(engine, tmp_path):
    first, result = train_and_store(engine, "a", "tr", tmp_path / "data", CONFIG)
    assert first.version == 1 and first.class_names == CLASSES and result.test_top1 is not None
    train_and_store(engine, "b", "tr", tmp_path / "data", CONFIG.model_copy(update={"seed": 1}))
    with pytest.raises(DuplicateTaskError, match="set new_version"):
        train_and_store(engine, "a", "tr", tmp_path / "data", CONFIG)

    images = sorted((tmp_path / "data" / "test").glob("*/*.jpg"))
    items = [(p, "ab"[i % 2]) for i, p in enumerate(images)]
    predictor = Predictor(engine, device="cpu", threads=2)
    mixed = predictor.predict(items, batch_size=4, top_k=2)
    assert [(p.path, p.task) for p in mixed] == items
    for task in "ab":  # a mixed batch gives each sample what a batch of its own task gives
        alone = predictor.predict([it for it in items if it[1] == task], top_k=2)
        same = [p for p in mixed if p.task == task]
        assert [p.labels for p in alone] == [p.labels for p in same]
        assert_close([p.scores for p in alone], [p.scores for p in same])

    loaded = load_tasks(engine, ["a", "b"])
    assert list(loaded.models) == ["tr"] and loaded.model_of("a") is loaded.model_of("b")
    assert loaded.data_config("a")["input_size"] == (3, 64, 64)

    out = export_task(engine, "a", tmp_path / "export")
    folded = timm.create_model("test_resnet", num_classes=3)
    folded.load_state_dict(load_file(out / "model.safetensors"), strict=True)

    with pytest.raises(TaskNotFoundError, match="row 1"):
        predictor.predict([(images[0], "nope")])
    with pytest.raises(DataError, match="top_k must be at least 1") as caught:
        predictor.predict([(images[0], "a")], top_k=0)
    assert caught.value.field == "top_k"
    with pytest.raises(DataError, match="precision must be one of fp32, bf16, got 'fp16'"):
        Predictor(engine, device="cpu", precision="fp16")


@pytest.mark.parametrize("protocol", ["vtab", "fgvc"])
def test_fast_input_path_equals_the_training_transform(tmp_path, protocol):
    """Decode + resize in a thread, then float conversion and normalisation as a batch: the same tensor, bit for
    bit, as timm's whole transform on the PIL image (which training and evaluation use)."""
    model = timm.create_model("test_vit", num_classes=0)
    paths = write_image_folder(tmp_path, ["x"], {"test": 3}, size=90)
    Image.open(paths[0]).convert("L").save(tmp_path / "gray.png")  # grayscale and PNG take the same path
    Image.open(paths[1]).convert("CMYK").save(tmp_path / "cmyk.jpg")
    paths += [tmp_path / "gray.png", tmp_path / "cmyk.jpg"]
    transform = build_transform(model, train=False, protocol=protocol, input_size=72)
    stage = split_transform(transform)
    fast = stage.normalize(torch.stack([stage.to_uint8(p) for p in paths]))
    slots = torch.zeros(len(paths), 72, 72, 3, dtype=torch.uint8)
    for slot, path in zip(slots, paths, strict=True):
        stage.decode_into(slot, path)
    assert_close(stage.normalize(slots), fast, rtol=0, atol=0)
    reference = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    assert_close(fast, reference, rtol=0, atol=0)
    from_bytes = stage.normalize(torch.stack([stage.to_uint8(p.read_bytes()) for p in paths]))
    assert_close(from_bytes, reference, rtol=0, atol=0)


@pytest.mark.parametrize("decode", ["threads", "processes"])
def test_predictor_gives_the_eager_model_outputs_and_names_bad_images(engine, tmp_path, decode):
    train_and_store(engine, "a", "tr", tmp_path / "data", CONFIG)
    images = sorted((tmp_path / "data" / "test").glob("*/*.jpg"))
    predictor = Predictor(engine, device="cpu", threads=2, decode=decode)
    got = predictor.predict([(p, "a") for p in images] + [(images[0].read_bytes(), "a")], batch_size=3)
    loaded = load_tasks(engine, ["a"])
    transform = loaded.transform("a")
    batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in images])
    with torch.no_grad():
        probs = loaded.model_of("a")(batch, "a").softmax(-1)
    assert [p.labels[0] for p in got[:-1]] == [CLASSES[int(i)] for i in probs.argmax(-1)]
    assert_close(torch.tensor([p.scores[0] for p in got[:-1]]), probs.max(-1).values)
    assert got[-1].labels == got[0].labels  # bytes in, same answer (the score up to the batch's float rounding)
    assert_close(got[-1].scores, got[0].scores, rtol=1e-6, atol=1e-6)

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(images[0].read_bytes()[:200])
    with pytest.raises(DataError, match="broken.jpg"):
        predictor.predict([(images[0], "a"), (broken, "a")])
    with pytest.raises(DataError, match="item 1"):
        predictor.predict([(b"not an image", "a")], source="request")
    assert predictor.predict([(p, "a") for p in images], batch_size=3) == got[:-1]  # an error spoils nothing
    prepared = predictor.prepare(images[1].read_bytes(), "a", name="image 0")
    assert predictor.run_prepared([prepared]) == [(got[1].labels, got[1].scores, "a", None)]
    with pytest.raises(DataError, match="image 7"):
        predictor.prepare(b"junk", "a", name="image 7")
    predictor.close()


def test_decoder_processes_write_the_bytes_threads_write(tmp_path):
    """Worker processes run the very decode of the threads: equal uint8 batches, odd images included."""
    from ssf_tasks.decode_workers import ProcessDecoder
    from ssf_tasks.image_input import ThreadDecoder, iter_batches

    paths = write_image_folder(tmp_path, ["x"], {"test": 9}, size=90)
    Image.open(paths[0]).convert("L").save(tmp_path / "gray.png")
    Image.open(paths[1]).convert("CMYK").save(tmp_path / "cmyk.jpg")
    sources = [*paths, tmp_path / "gray.png", tmp_path / "cmyk.jpg", paths[2].read_bytes()]
    stage = split_transform(build_transform(timm.create_model("test_vit"), train=False, protocol="vtab", input_size=72))
    threads, processes = ThreadDecoder(2), ProcessDecoder(2)
    try:
        batches = {
            name: torch.cat([b.clone() for b, _ in iter_batches(decoder, stage, sources, 4, (72, 72))])
            for name, decoder in (("threads", threads), ("processes", processes))
        }
        assert torch.equal(batches["threads"], batches["processes"])
        assert torch.equal(processes.decode_one(stage, sources[-1], "bytes", (72, 72)), batches["threads"][-1])
    finally:
        threads.close()
        processes.close()


def test_decoder_process_killed_mid_batch_fails_the_batch_not_the_caller(tmp_path):
    """A decode worker that dies (OOM killer, a crash in a codec) fails the images in flight with a message, is
    replaced, and the next call decodes as before: nothing waits forever."""
    import os
    import signal
    import time

    from ssf_tasks.decode_workers import ProcessDecoder
    from ssf_tasks.image_input import iter_batches

    paths = write_image_folder(tmp_path, ["x"], {"test": 8}, size=90)
    stage = split_transform(build_transform(timm.create_model("test_vit"), train=False, protocol="vtab", input_size=72))
    decoder = ProcessDecoder(2)
    try:
        expected = torch.cat([b.clone() for b, _ in iter_batches(decoder, stage, paths, 4, (72, 72))])
        buffers = decoder.buffers(1, 400, (72, 72))
        futures = decoder.submit(stage, buffers[0], paths * 50, [None] * 400)
        killed = {worker.process.pid for worker in decoder._workers}
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        with pytest.raises(DataError, match="decoder process stopped"):
            for future in futures:
                future.result(timeout=30)
        decoder.release(buffers)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(
            w.process.pid not in killed and w.process.is_alive() for w in decoder._workers
        ):
            time.sleep(0.1)
        again = torch.cat([b.clone() for b, _ in iter_batches(decoder, stage, paths, 4, (72, 72))])
        assert torch.equal(again, expected)
    finally:
        decoder.close()


def test_refresh_adds_versions_and_removes_tasks_without_changing_the_others(engine, tmp_path):
    train_and_store(engine, "a", "tr", tmp_path / "data", CONFIG)
    images = sorted((tmp_path / "data" / "test").glob("*/*.jpg"))
    predictor = Predictor(engine, device="cpu", threads=2)
    before = predictor.predict([(p, "a") for p in images], top_k=3)
    assert predictor.refresh() == {"added": [], "updated": [], "removed": []}

    other = open_registry(str(engine.url))  # another writer, as `task add` in another process would be
    train_and_store(other, "b", "tr", tmp_path / "data", CONFIG.model_copy(update={"seed": 1}))
    assert predictor.refresh() == {"added": ["b"], "updated": [], "removed": []}
    mixed = predictor.predict([(p, "ab"[i % 2]) for i, p in enumerate(images)], top_k=3)
    after = [p for p in mixed if p.task == "a"]
    assert [p.scores for p in after] == [p.scores for p in before[::2]]  # bit for bit
    assert [p.labels for p in after] == [p.labels for p in before[::2]]

    train_and_store(other, "a", "tr", tmp_path / "data", CONFIG.model_copy(update={"seed": 7}), new_version=True)
    assert predictor.refresh() == {"added": [], "updated": ["a"], "removed": []}
    assert predictor.record("a").version == 2
    remove_task(other, "b")
    assert predictor.refresh() == {"added": [], "updated": [], "removed": ["b"]}
    with pytest.raises(TaskNotFoundError, match="unknown task 'b'"):
        predictor.predict([(images[0], "b")])
    other.dispose()


def store_variant(engine, name, *, like="a", seed=0, classes=None, new_version=False):
    """Store task ``name`` as a random variant of task ``like`` (same backbone and transform), without training."""
    from sqlalchemy.orm import Session

    from ssf_tasks import registry
    from ssf_tasks.taskfiles import task_payload, task_tensors

    with Session(engine) as s:
        record = registry.get_task(s, like)
        state = task_tensors(registry.get_task_payload(s, like, record.version), like)
    generator = torch.Generator().manual_seed(seed)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in state.items()}
    names = record.class_names
    if classes is not None:
        names = [f"c{i}" for i in range(classes)]
        width = state["head.weight"].shape[1]
        state["head.weight"] = torch.randn(classes, width, generator=generator) * 0.1
        state["head.bias"] = torch.zeros(classes)
    record = record.model_copy(update={"name": name, "class_names": names, "payload_sha256": ""})
    with registry.transaction(engine, "test") as s:
        registry.add_task_version(s, record, task_payload(state), new_version=new_version)


def test_refresh_writes_new_tasks_into_spare_rows_and_reuses_a_retired_row_only_after_its_readers(engine, tmp_path):
    """A task registered while serving goes into a spare row of the serving model (no table reallocated, so a
    compiled forward needs no new graph); a replaced version's row is not reused while a call still reads it."""
    train_and_store(engine, "a", "tr", tmp_path / "data", CONFIG)
    images = sorted((tmp_path / "data" / "test").glob("*/*.jpg"))
    predictor = Predictor(engine, device="cpu", threads=2)
    before = predictor.predict([(p, "a") for p in images], top_k=3)
    model = predictor._state.models["tr"]
    tables = [t.data_ptr() for t in model.parameters()]

    store_variant(engine, "b", seed=1)
    assert predictor.refresh() == {"added": ["b"], "updated": [], "removed": []}
    assert predictor._state.models["tr"] is model and [t.data_ptr() for t in model.parameters()] == tables
    mixed = predictor.predict([(p, "ab"[i % 2]) for i, p in enumerate(images)], top_k=3)
    fresh = Predictor(engine, device="cpu", threads=2)
    expected = fresh.predict([(p, "ab"[i % 2]) for i, p in enumerate(images)], top_k=3)
    fresh.close()
    assert [p.labels for p in mixed] == [p.labels for p in expected]
    assert_close([p.scores for p in mixed], [p.scores for p in expected])
    assert [p.scores for p in mixed if p.task == "a"] == [p.scores for p in before[::2]]  # bit for bit

    b_items = [(p, "b") for p in images]
    b_before = predictor.predict(b_items, top_k=3)
    with predictor._reading() as reading:  # a call still running on the state before the update
        store_variant(engine, "b", seed=2, new_version=True)
        assert predictor.refresh()["updated"] == ["b"]
        store_variant(engine, "c", seed=3)
        assert predictor.refresh()["added"] == ["c"]
        assert reading.rows["b"] not in (predictor._state.rows["b"], predictor._state.rows["c"])
        assert predictor._predict(reading, b_items, 64, 3, "test") == b_before  # the old version, unchanged
    assert predictor.predict(b_items, top_k=3) != b_before
    store_variant(engine, "d", seed=4)
    predictor.refresh()
    assert predictor._state.rows["d"] == reading.rows["b"]  # released once its reader finished, then reused
    assert [t.data_ptr() for t in model.parameters()] == tables

    store_variant(engine, "wide", seed=5, classes=40)  # more classes than the heads have columns: a new model
    assert predictor.refresh()["added"] == ["wide"]
    assert predictor._state.models["tr"] is not model
    assert predictor.predict([(p, "a") for p in images], top_k=3) == before
    assert len(predictor.predict([(images[0], "wide")], top_k=40)[0].labels) == 40
    predictor.close()


def test_read_only_registry_fails_before_training(engine, tmp_path, monkeypatch):
    # A registry that cannot be written must be refused in the first second, not after the whole run.
    def must_not_train(*args, **kwargs):
        raise AssertionError("training started on a registry that cannot store its result")

    monkeypatch.setattr(training_job, "train_task", must_not_train)
    read_only = open_registry(f"sqlite:///file:{tmp_path / 'registry.db'}?mode=ro&uri=true")
    try:
        with pytest.raises(RegistryError, match="readonly"):
            train_and_store(read_only, "a", "tr", tmp_path / "data", CONFIG)
    finally:
        read_only.dispose()
    assert list_tasks(engine) == []


def test_failed_export_leaves_no_partial_files(engine, tmp_path):
    train_and_store(engine, "a", "tr", tmp_path / "data", CONFIG)
    out = tmp_path / "export"
    (out / "config.json").mkdir(parents=True)  # config.json cannot be replaced: the export must fail as a whole
    with pytest.raises(SSFTasksError, match="config.json"):
        export_task(engine, "a", out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]  # no model.safetensors, no temp files


def test_batcher_mixes_requests_and_refuses_work_beyond_its_queue(engine, tmp_path):
    """Requests of two tasks sent together run as one batch; more waiting images than the cap is a QueueFullError
    (the server's 503), and nothing already queued is lost."""
    import asyncio

    from ssf_tasks.serve.batcher import Batcher, QueueFullError

    train_and_store(engine, "a", "tr", tmp_path / "data", CONFIG)
    train_and_store(engine, "b", "tr", tmp_path / "data", CONFIG.model_copy(update={"seed": 1}))
    images = sorted((tmp_path / "data" / "test").glob("*/*.jpg"))
    predictor = Predictor(engine, device="cpu", threads=2)
    sizes: list[int] = []
    batcher = Batcher(predictor, max_batch_size=8, max_delay=0.2, max_queue=4, on_batch=lambda n, _: sizes.append(n))

    async def scenario():
        first = [predictor.prepare(images[0], "a"), predictor.prepare(images[1], "b")]
        second = [predictor.prepare(images[2], "b")]
        pending = [asyncio.ensure_future(batcher.submit(first, 2)), asyncio.ensure_future(batcher.submit(second, 1))]
        await asyncio.sleep(0)
        with pytest.raises(QueueFullError):
            await batcher.submit([predictor.prepare(images[3], "a")] * 2, 1)
        return await asyncio.gather(*pending)

    (one, two), (three,) = asyncio.run(scenario())
    batcher.close()
    assert sizes == [3]  # both requests, both tasks, one forward
    expected = predictor.predict([(images[0], "a"), (images[1], "b"), (images[2], "b")], top_k=2)
    assert (one, two) == (
        (expected[0].labels, expected[0].scores, "a", None),
        (expected[1].labels, expected[1].scores, "b", None),
    )
    assert three == (expected[2].labels[:1], expected[2].scores[:1], "b", None)
