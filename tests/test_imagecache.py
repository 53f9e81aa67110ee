"""The image cache: letterbox geometry, skips and errors, no-change reruns, exact resume."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from kedro.io import DatasetError

from pneumonia_kedro.boxes import Letterbox, xywh_to_xyxy, xyxy_to_xywh
from pneumonia_kedro.dicom import DicomFolder
from pneumonia_kedro.errors import DicomError
from pneumonia_kedro.imagecache import (
    CacheConfig,
    ImageCache,
    build,
    decode_chunks,
    files,
    plan,
    preprocess,
    read_state,
)
from pneumonia_kedro.imagecache import decoding as imagecache
from tests.conftest import build_killed_at_chunk, write_demo_dicoms


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dicoms")
    write_demo_dicoms(folder, n_positive=3, n_negative=4, seed=11)
    return folder


def copy_folder(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_cache_holds_every_image_letterboxed(demo_folder, tmp_path):
    folder = DicomFolder.scan(str(demo_folder))
    config = CacheConfig(image_size=64, workers=0, chunk_size=3, progress=False)
    figures = build(plan(folder, folder.patient_ids, config), tmp_path / "cache")
    cache = ImageCache(tmp_path / "cache")
    assert {k: figures[k] for k in ("images", "decoded", "reused", "skipped")} == {
        "images": 7, "decoded": 7, "reused": 0, "skipped": 0}
    # Seconds are rounded to the millisecond: images/s lies within that rounding.
    seconds = figures["seconds"]
    assert seconds > 0
    assert 7 / (seconds + 0.0005) - 0.05 <= figures["images_per_second"] \
        <= 7 / max(seconds - 0.0005, 1e-9) + 0.05
    assert cache.manifest["build"] == figures  # what the cache report shows
    assert cache.images.shape == (7, 64, 64) and cache.images.dtype == np.uint8
    assert cache.index["patientId"].tolist() == folder.patient_ids
    assert (cache.index["scale_x"] == 64 / 1024).all()
    assert set(cache.index["view_position"]) <= {"AP", "PA"}


def test_parallel_build_equals_in_process_build(demo_folder, tmp_path):
    folder = DicomFolder.scan(str(demo_folder))
    serial = CacheConfig(image_size=64, workers=0, chunk_size=2, progress=False)
    parallel = CacheConfig(image_size=64, workers=2, chunk_size=2, progress=False)
    build(plan(folder, folder.patient_ids, serial), tmp_path / "serial")
    build(plan(folder, folder.patient_ids, parallel), tmp_path / "parallel")
    a, b = ImageCache(tmp_path / "serial"), ImageCache(tmp_path / "parallel")
    np.testing.assert_array_equal(a.images, b.images)
    assert a.index.equals(b.index)


def test_rerun_with_nothing_changed_decodes_nothing_and_size_change_rebuilds(demo_folder,
                                                                             tmp_path):
    folder = DicomFolder.scan(str(demo_folder))
    config = CacheConfig(image_size=32, workers=0, progress=False)
    first = build(plan(folder, folder.patient_ids, config), tmp_path / "c")
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "c").rglob("*")}
    # Untouched: the manifest keeps the figures of the build that made the cache.
    assert build(plan(folder, folder.patient_ids, config), tmp_path / "c") == first
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "c").rglob("*")} == before
    bigger = CacheConfig(image_size=48, workers=0, progress=False)
    assert build(plan(folder, folder.patient_ids, bigger), tmp_path / "c")["decoded"] == 7
    assert ImageCache(tmp_path / "c").images.shape == (7, 48, 48)


def test_interrupted_build_resumes_to_an_identical_cache(demo_folder, tmp_path, monkeypatch):
    folder = DicomFolder.scan(str(demo_folder))
    config = CacheConfig(image_size=64, workers=0, chunk_size=2, progress=False)
    cache_plan = plan(folder, folder.patient_ids, config)
    build(cache_plan, tmp_path / "reference")

    build_killed_at_chunk(cache_plan, tmp_path / "resumed", 3, monkeypatch)
    assert not (tmp_path / "resumed" / "index.parquet").exists()
    figures = build(cache_plan, tmp_path / "resumed")
    assert (figures["decoded"], figures["reused"]) == (3, 4)
    reference, resumed = ImageCache(tmp_path / "reference"), ImageCache(tmp_path / "resumed")
    np.testing.assert_array_equal(reference.images, resumed.images)
    assert reference.index.equals(resumed.index)
    assert (tmp_path / "reference/images.npy").read_bytes() == \
        (tmp_path / "resumed/images.npy").read_bytes()


def test_a_kill_between_a_chunk_and_its_bookkeeping_then_another_chunk_size(demo_folder,
                                                                            tmp_path,
                                                                            monkeypatch):
    """A chunk's record is the only note that its rows are done. With a second note (the
    former done.npy), a kill between the two and a changed chunk_size decoded those rows
    again under another record file: the index then listed patients twice."""
    folder = DicomFolder.scan(str(demo_folder))
    config = CacheConfig(image_size=64, workers=0, chunk_size=3, progress=False)
    build(plan(folder, folder.patient_ids, config), tmp_path / "reference")

    real_write = files._write_atomic
    writes = {"n": 0}

    def killed_after_second_record(path, data):
        real_write(path, data)
        writes["n"] += 1
        if path.parent.name == "records" and writes["n"] == 3:  # manifest, two records
            raise KeyboardInterrupt

    monkeypatch.setattr(files, "_write_atomic", killed_after_second_record)
    with pytest.raises(KeyboardInterrupt):
        build(plan(folder, folder.patient_ids, config), tmp_path / "resumed")
    monkeypatch.setattr(files, "_write_atomic", real_write)
    other = CacheConfig(image_size=64, workers=0, chunk_size=2, progress=False)
    assert plan(folder, [], other).fingerprint() == plan(folder, [], config).fingerprint()
    figures = build(plan(folder, folder.patient_ids, other), tmp_path / "resumed")
    assert (figures["decoded"], figures["reused"]) == (1, 6)
    reference, resumed = ImageCache(tmp_path / "reference"), ImageCache(tmp_path / "resumed")
    assert resumed.index["patientId"].tolist() == folder.patient_ids  # each once
    assert reference.index.equals(resumed.index)
    np.testing.assert_array_equal(reference.images, resumed.images)
    assert not (tmp_path / "resumed" / "done.npy").exists()


def test_the_datasets_write_chunks_and_read_what_is_finished(demo_folder, tmp_path):
    from pneumonia_kedro.datasets import ImageCacheDataset, ImageCacheStateDataset

    folder = DicomFolder.scan(str(demo_folder))
    dataset = ImageCacheDataset(path=str(tmp_path / "cache"))
    state = ImageCacheStateDataset(path=str(tmp_path / "cache"))
    assert not dataset.exists() and state.load().fingerprint is None
    cache_plan = plan(folder, folder.patient_ids, CacheConfig(image_size=32, workers=0,
                                                              chunk_size=3, progress=False))
    chunks = decode_chunks(cache_plan, state.load())
    start, first = next(chunks), next(chunks)
    assert start.start["images"] == 7 and first.rows == [0, 1, 2]
    dataset.save(start)
    dataset.save(first)
    assert not dataset.exists()  # started, not complete
    finished = state.load()
    assert finished.fingerprint == cache_plan.fingerprint() and not finished.complete
    assert [r["row"] for r in finished.records] == [0, 1, 2]
    for chunk in decode_chunks(cache_plan, finished):  # a new run resumes after the chunk
        assert chunk.start is None and 0 not in chunk.rows
        dataset.save(chunk)
    assert dataset.exists() and len(dataset.load()) == 7 and state.load().complete
    with pytest.raises(DatasetError, match="read-only"):
        state.save(finished)
    (tmp_path / "cache" / "index.parquet").unlink()  # a damaged cache is not a complete one
    assert not dataset.exists()


def test_a_build_yields_one_chunk_also_when_nothing_needs_decoding(demo_folder, tmp_path):
    folder = DicomFolder.scan(str(demo_folder))
    config = CacheConfig(image_size=32, workers=0, progress=False)
    build(plan(folder, folder.patient_ids, config), tmp_path / "c")
    (chunk,) = decode_chunks(plan(folder, folder.patient_ids, config), read_state(tmp_path / "c"))
    assert chunk.start is None and chunk.rows == [] and chunk.index is None
    assert chunk.build is None  # nothing to write
    empty = list(decode_chunks(plan(folder, [], config), read_state(tmp_path / "none")))
    assert empty[0].start["images"] == 0 and empty[-1].build["images"] == 0
    build(plan(folder, [], config), tmp_path / "none")
    assert len(ImageCache(tmp_path / "none")) == 0


def test_workers_hand_back_a_few_chunks_at_a_time(demo_folder, tmp_path, monkeypatch):
    """Pixels travel back from the workers: only a few chunks may wait in memory at once."""
    folder = DicomFolder.scan(str(demo_folder))
    config = CacheConfig(image_size=32, workers=1, chunk_size=1, progress=False)
    submitted = []
    real_submit = imagecache.ProcessPoolExecutor.submit

    def counting_submit(self, fn, *args):
        submitted.append(args[1][0][0])
        return real_submit(self, fn, *args)

    monkeypatch.setattr(imagecache.ProcessPoolExecutor, "submit", counting_submit)
    chunks = decode_chunks(plan(folder, folder.patient_ids, config),
                           read_state(tmp_path / "c"))
    assert next(chunks).start is not None
    first = next(chunks)
    assert len(submitted) == 3  # two in flight before the first came back, one more after
    rest = list(chunks)
    assert sorted(first.rows + [row for chunk in rest for row in chunk.rows]) == list(range(7))
    assert sorted(submitted) == list(range(7)) and rest[-1].build["decoded"] == 7


def test_bad_file_stops_the_build_or_is_skipped_and_reported(demo_folder, tmp_path):
    source = copy_folder(demo_folder, tmp_path / "dicoms")
    bad = sorted(source.glob("*.dcm"))[2]
    bad.write_bytes(bad.read_bytes()[:2000])  # truncated mid-pixel-data
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    folder = DicomFolder.scan(str(source))
    strict = CacheConfig(image_size=32, workers=0, progress=False)
    with pytest.raises(DicomError, match=bad.name):
        build(plan(folder, folder.patient_ids, strict), tmp_path / "strict")
    lenient = CacheConfig(image_size=32, workers=2, chunk_size=2, on_error="skip",
                          progress=False)
    build(plan(folder, folder.patient_ids, lenient), tmp_path / "lenient")
    cache = ImageCache(tmp_path / "lenient")
    skipped = cache.index.loc[cache.index["status"] == "skipped"]
    assert skipped["patientId"].tolist() == [bad.stem]
    assert bad.name in skipped["reason"].iloc[0]
    assert len(cache.usable) == 6 and bad.stem not in set(cache.usable["patientId"])
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before  # raw data untouched


def test_non_square_image_is_letterboxed_and_boxes_map_back():
    image = np.full((300, 600), 200, dtype=np.uint8)
    square, box = preprocess(image, 100)
    assert square.shape == (100, 100)
    assert (box.offset_x, box.offset_y, box.resized_width, box.resized_height) == (0, 25, 100, 50)
    assert square[:25].max() == 0 and square[75:].max() == 0 and square[30:70].min() == 200
    original = np.array([[60.0, 30.0, 300.0, 150.0]])
    cached = box.to_cache(original)
    np.testing.assert_allclose(cached, [[10.0, 30.0, 50.0, 50.0]])
    np.testing.assert_allclose(box.to_original(cached), original)


@given(
    height=st.integers(16, 3000), width=st.integers(16, 3000), size=st.integers(32, 1024),
    box=st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0.01, 1), st.floats(0.01, 1)),
)
def test_box_mapping_round_trips_within_half_a_pixel(height, width, size, box):
    letterbox = Letterbox.fit(height, width, size)
    x, y = box[0] * width * 0.9, box[1] * height * 0.9
    w, h = box[2] * (width - x), box[3] * (height - y)
    original = xywh_to_xyxy([[x, y, w, h]])
    back = letterbox.to_original(letterbox.to_cache(original))
    assert np.abs(back - original).max() <= 0.5
    np.testing.assert_allclose(xyxy_to_xywh(original), [[x, y, w, h]], atol=1e-9)
    cached = letterbox.to_cache(original)
    assert (cached >= -1e-9).all() and (cached <= size + 1e-9).all()


@pytest.mark.parametrize("size", [128, 256, 512, 600])
def test_reduced_jpeg_decoding_matches_full_decode_and_area_resize(demo_folder, size):
    from pneumonia_kedro.dicom import decode

    data = sorted(demo_folder.glob("*.dcm"))[0].read_bytes()
    fast, fast_box = preprocess(decode(data, "x.dcm", target_size=size), size)
    full, full_box = preprocess(decode(data, "x.dcm"), size)
    assert fast_box == full_box
    difference = np.abs(fast.astype(int) - full.astype(int))
    assert difference.max() <= 3 and difference.mean() < 0.3


HOLD_A_BUILD = """
import sys, time
from pathlib import Path
from pneumonia_kedro.imagecache.files import CacheChunk, write_chunk
path = Path(sys.argv[1])
write_chunk(path, CacheChunk(start={"fingerprint": "other-run", "image_size": 64,
                                    "preprocessing_version": 3, "images": 7,
                                    "complete": False}))
(path.parent / "started").write_text("yes")
time.sleep(600)  # in the middle of its build, until killed
"""


def test_a_second_build_of_a_cache_another_process_builds_is_refused_by_name(demo_folder,
                                                                            tmp_path):
    """Two cache runs at once: one died with a raw `OSError: Directory not empty` from the
    build's rmtree of the folder the other was writing."""
    import signal
    import subprocess
    import sys
    import time

    from pneumonia_kedro.imagecache.files import CacheBusyError

    path = tmp_path / "caches" / "train"
    other = subprocess.Popen([sys.executable, "-c", HOLD_A_BUILD, str(path)])
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "caches" / "started").is_file():
            assert other.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        folder = DicomFolder.scan(str(demo_folder))
        config = CacheConfig(image_size=64, workers=0, chunk_size=3, progress=False)
        message = rf"another run is building the image cache {path} \(pid {other.pid} on "
        with pytest.raises(CacheBusyError, match=message):
            build(plan(folder, folder.patient_ids, config), path)
        with pytest.raises(CacheBusyError, match="wait for it to finish, then run again"):
            files.write_chunk(path, files.CacheChunk(start={"fingerprint": "mine"}))
        # The other run's files are as it left them.
        assert read_state_unlocked(path) == "other-run"
    finally:
        other.send_signal(signal.SIGKILL)
        other.wait()
    # A killed build lets go of the lock: the next one rebuilds the cache.
    figures = build(plan(folder, folder.patient_ids, config), path)
    assert figures["decoded"] == 7 and ImageCache(path).images.shape == (7, 64, 64)


def read_state_unlocked(path: Path) -> str:
    import json

    return json.loads((path / "manifest.json").read_text())["fingerprint"]
