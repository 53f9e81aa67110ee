"""The sharded image cache (``cache.shard_size``) and where a cache and its DICOMs may live:
a sharded cache equals the unsharded one image for image and box for box, a build killed
between parts resumes, a changed shard_size rebuilds (and says so), a bad shard_size is
refused by name before any node; a cache named by an fsspec URL is refused, DICOMs named by
one are read."""

from __future__ import annotations

import logging
import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from kedro.io import DataCatalog, DatasetError

from pneumonia_kedro.config import ConfigError, from_params
from pneumonia_kedro.datasets import DicomFolderDataset
from pneumonia_kedro.datasets.image_cache import ImageCacheDataset
from pneumonia_kedro.dicom import DicomFolder
from pneumonia_kedro.imagecache import (
    CacheConfig,
    CacheLocationError,
    ImageCache,
    ShardedImages,
    build,
    plan,
)
from pneumonia_kedro.inference import cached_squares
from pneumonia_kedro.training import CachedDetectionDataset
from tests.conftest import build_killed_at_chunk, run_session, write_demo_dicoms

SIZE = 48


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[DicomFolder, pd.DataFrame]:
    folder = tmp_path_factory.mktemp("shard_dicoms")
    patients = write_demo_dicoms(folder, n_positive=3, n_negative=4, seed=17)
    return DicomFolder.scan(str(folder)), patients


def _plan(folder: DicomFolder, shard_size: int | None):
    config = CacheConfig(image_size=SIZE, workers=0, chunk_size=2, progress=False,
                         shard_size=shard_size)
    return plan(folder, folder.patient_ids, config)


@pytest.fixture(scope="module")
def one_folder(demo, tmp_path_factory) -> ImageCache:
    path = tmp_path_factory.mktemp("one_folder") / "cache"
    build(_plan(demo[0], None), path)
    return ImageCache(path)


def test_a_sharded_cache_equals_the_unsharded_one_image_for_image_and_box_for_box(
        demo, one_folder, tmp_path):
    folder, patients = demo
    # 7 images in parts of 3: 3 + 3 + 1, chunks of 2 that never cross a part (chunks that
    # finish out of order, across parts: test_ray.py's sharded build on two nodes).
    figures = build(_plan(folder, 3), tmp_path / "cache")
    assert (figures["images"], figures["decoded"], figures["reused"]) == (7, 7, 0)
    sharded = ImageCache(tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        "index.parquet", "manifest.json", "part-00000", "part-00001", "part-00002"]
    assert not (tmp_path / "cache" / "images.npy").exists()
    images, reference = sharded.images, one_folder.images
    assert isinstance(images, ShardedImages) and images.shape == reference.shape == (7, SIZE, SIZE)
    pd.testing.assert_frame_equal(sharded.index, one_folder.index)  # rows, letterboxes, flags
    np.testing.assert_array_equal(np.asarray(images), reference)
    for row in range(7):  # one image: a view of its part's memory map
        np.testing.assert_array_equal(images[row], reference[row])
    rows = np.array([6, 0, 4, 3, 3, -1])  # unsorted, across parts, repeated, from the end
    np.testing.assert_array_equal(images[rows], reference[rows])
    np.testing.assert_array_equal(images[2:5], reference[2:5])
    np.testing.assert_array_equal(images[[1, 5], 10:20, 5:9], reference[[1, 5], 10:20, 5:9])
    np.testing.assert_array_equal(images[4, 7], reference[4, 7])
    with pytest.raises(IndexError, match="row 7 is out of range for 7 cached images"):
        images[7]
    # Each part is an ordinary cache of its images (rows from 0).
    part = ImageCache(tmp_path / "cache" / "part-00001")
    np.testing.assert_array_equal(part.images, reference[3:6])
    assert part.index["patientId"].tolist() == folder.patient_ids[3:6]
    # Training and inference read it unchanged: the same pixels and boxes, after pickling
    # (DataLoader workers, Ray tasks).
    trained_on = [CachedDetectionDataset(cache, patients) for cache in (one_folder, sharded)]
    a, b = trained_on[0], pickle.loads(pickle.dumps(trained_on[1]))
    assert any(len(boxes) for boxes in a.boxes)
    for (image_a, target_a), (image_b, target_b) in zip(
            a.__getitems__(list(range(len(a)))[::-1]), b.__getitems__(list(range(len(b)))[::-1]),
            strict=True):
        assert image_a.equal(image_b)
        np.testing.assert_array_equal(target_a["boxes"], target_b["boxes"])
    for square_a, square_b in zip(cached_squares(one_folder), cached_squares(sharded),
                                  strict=True):
        assert (square_a.key, square_a.letterbox) == (square_b.key, square_b.letterbox)
        np.testing.assert_array_equal(square_a.pixels, square_b.pixels)


def test_a_build_killed_between_parts_resumes_and_leaves_finished_parts_alone(
        demo, tmp_path, monkeypatch):
    folder, _ = demo
    cache_plan = _plan(folder, 4)  # parts of 4 + 3 images, chunks of 2
    build(cache_plan, tmp_path / "reference")
    target = tmp_path / "resumed"
    build_killed_at_chunk(cache_plan, target, 3, monkeypatch)  # part 0 done, part 1 not begun
    assert ImageCache(target / "part-00000").manifest["complete"]
    assert not (target / "part-00001" / "index.parquet").exists()
    assert not (target / "index.parquet").exists()
    first_part = {p: p.stat().st_mtime_ns for p in (target / "part-00000").rglob("*")}
    figures = build(cache_plan, target)
    assert (figures["decoded"], figures["reused"]) == (3, 4)
    assert {p: p.stat().st_mtime_ns for p in (target / "part-00000").rglob("*")} == first_part
    for part in ("part-00000", "part-00001"):
        assert (tmp_path / "reference" / part / "images.npy").read_bytes() == \
            (target / part / "images.npy").read_bytes()
    pd.testing.assert_frame_equal(ImageCache(target).index,
                                  ImageCache(tmp_path / "reference").index)


def test_a_part_deleted_by_hand_is_built_again_not_called_up_to_date(demo, tmp_path,
                                                                    monkeypatch):
    folder, _ = demo
    cache_plan = _plan(folder, 4)  # parts of 4 + 3 images, chunks of 2
    build(cache_plan, tmp_path / "reference")
    reference = np.asarray(ImageCache(tmp_path / "reference").images)
    target = tmp_path / "cache"
    build(cache_plan, target)
    shutil.rmtree(target / "part-00001")
    figures = build(cache_plan, target)
    assert figures["decoded"] == 3  # it was "up to date", and reading row 4 then failed
    np.testing.assert_array_equal(np.asarray(ImageCache(target).images), reference)

    # Deleted again, and the rebuild killed after the part's first chunk: the part's rows
    # were then served as black images by a cache called up to date.
    shutil.rmtree(target / "part-00001")
    build_killed_at_chunk(cache_plan, target, 2, monkeypatch)
    figures = build(cache_plan, target)
    assert (figures["decoded"], figures["reused"]) == (1, 6)
    np.testing.assert_array_equal(np.asarray(ImageCache(target).images), reference)


@pytest.mark.parametrize("shard_size", [None, 4])
def test_an_images_file_deleted_by_hand_is_decoded_again(demo, tmp_path, shard_size):
    """Only ``images.npy`` gone: its records still said every row was done, so nothing
    was decoded and the cache was marked complete without its images."""
    folder, _ = demo
    cache_plan = _plan(folder, shard_size)
    build(cache_plan, tmp_path / "reference")
    target = tmp_path / "cache"
    build(cache_plan, target)
    (target / ("images.npy" if shard_size is None else "part-00000/images.npy")).unlink()
    figures = build(cache_plan, target)
    assert figures["decoded"] == (7 if shard_size is None else 4)
    np.testing.assert_array_equal(np.asarray(ImageCache(target).images),
                                  np.asarray(ImageCache(tmp_path / "reference").images))


def test_a_changed_shard_size_rebuilds_and_says_so_and_null_is_one_folder_again(
        demo, one_folder, tmp_path, caplog):
    folder, _ = demo
    path = tmp_path / "cache"
    shutil.copytree(one_folder.path, path)
    caplog.set_level(logging.INFO, logger="pneumonia_kedro.imagecache")
    assert build(_plan(folder, 5), path)["decoded"] == 7
    assert "was built as one folder; rebuilding it in parts of 5 images" in caplog.text
    assert build(_plan(folder, 5), path)["decoded"] == 7  # up to date: the same figures
    assert "is up to date" in caplog.text
    caplog.clear()
    assert build(_plan(folder, 2), path)["decoded"] == 7
    assert "was built in parts of 5 images; rebuilding it in parts of 2 images" in caplog.text
    assert sorted(p.name for p in path.glob("part-*")) == [f"part-0000{k}" for k in range(4)]
    np.testing.assert_array_equal(np.asarray(ImageCache(path).images), one_folder.images)
    caplog.clear()
    build(_plan(folder, None), path)
    assert "was built in parts of 2 images; rebuilding it as one folder" in caplog.text
    # Without shard_size the cache is today's, byte for byte: no trace of the parts.
    assert not list(path.glob("part-*"))
    assert (path / "images.npy").read_bytes() == (one_folder.path / "images.npy").read_bytes()
    assert ImageCache(path).manifest["fingerprint"] == one_folder.manifest["fingerprint"]


@pytest.mark.parametrize(("value", "message"), [
    (0, "params:cache.shard_size = 0 is out of range: it must be >= 1"),
    (-50000, "params:cache.shard_size = -50000 is out of range"),
    ("50k", "params:cache.shard_size = '50k' does not match the expected type"),
    (2.5, "params:cache.shard_size = 2.5 does not match the expected type"),
])
def test_a_bad_shard_size_names_the_key(value, message):
    with pytest.raises(ConfigError, match=message):
        from_params(CacheConfig, {"shard_size": value}, "cache")
    assert from_params(CacheConfig, {"shard_size": None}, "cache").shard_size is None


@pytest.mark.slow
def test_a_bad_shard_size_and_a_url_run_storage_are_refused_before_any_node(kedro_project,
                                                                           monkeypatch):
    """A run storage URL became a local folder named ``s3:`` on each Ray worker."""
    from kedro.framework.project import configure_project
    from kedro.framework.startup import bootstrap_project

    monkeypatch.delenv("FOLDS", raising=False)
    monkeypatch.delenv("KEDRO_ENV", raising=False)
    bootstrap_project(kedro_project)
    bad = {"cache": {"shard_size": 0},
           "engine": {"backend": "ray", "storage": "s3://bucket/runs"}}
    try:
        with pytest.raises(ConfigError, match="2 bad parameter") as info:
            run_session(kedro_project, env="demo", params=bad)
    finally:
        configure_project("pneumonia_kedro")
    assert "params:cache.shard_size = 0 is out of range: it must be >= 1" in str(info.value)
    assert "params:engine.storage = 's3://bucket/runs' is a URL, but the training writes " \
        "its checkpoints" in str(info.value)
    assert not (kedro_project / "data").exists()  # no node ran


def test_a_cache_named_by_an_fsspec_url_is_refused_and_a_file_url_is_a_path(
        demo, one_folder, tmp_path):
    catalog = DataCatalog.from_config({"train_image_cache": {
        "type": "pneumonia_kedro.datasets.ImageCacheDataset", "path": "s3://bucket/cache"}})
    with pytest.raises(DatasetError, match="train_image_cache") as info:
        catalog["train_image_cache"]
    assert "the cache is memory-mapped, so it needs a folder on a mounted file system" \
        in str(info.value)
    with pytest.raises(CacheLocationError, match="'memory://cache'"):
        ImageCache("memory://cache")
    path = tmp_path / "cache"
    build(_plan(demo[0], 3), f"file://{path}")
    loaded = ImageCacheDataset(path=f"file://{path}").load()
    assert loaded.path == path
    np.testing.assert_array_equal(np.asarray(loaded.images), one_folder.images)


def test_dicoms_named_by_an_fsspec_url_cache_as_the_local_folder(demo, one_folder):
    import fsspec

    local, _ = demo
    url = "memory://shards_test/dicoms"
    try:
        DicomFolderDataset(path=url).save(
            {patient_id: local.read_bytes(patient_id) for patient_id in local.patient_ids})
        remote = DicomFolderDataset(path=url).load()
        assert remote.protocol == "memory" and remote.patient_ids == local.patient_ids
        # workers=0: a memory:// file system lives in this process only (s3://, gs://
        # are read by every worker process or Ray task).
        path = Path(one_folder.path).parent / "from_url"
        build(_plan(remote, None), path)
        from_url = ImageCache(path)
        np.testing.assert_array_equal(from_url.images, one_folder.images)
        pd.testing.assert_frame_equal(from_url.index, one_folder.index)
    finally:
        fsspec.filesystem("memory").rm("/shards_test", recursive=True)


@pytest.mark.parametrize("shard_size", [None, 4])
def test_a_cache_opened_by_a_relative_path_unpickles_elsewhere(demo, tmp_path, monkeypatch,
                                                               shard_size):
    """The catalog names caches relative to the project; a worker process or Ray actor that
    starts in another folder looked for them there."""
    import pickle

    folder, _ = demo
    build(_plan(folder, shard_size), tmp_path / "cache")
    monkeypatch.chdir(tmp_path)
    shipped = pickle.dumps(ImageCache("cache"))
    images = pickle.dumps(ImageCache("cache").images)
    monkeypatch.chdir(tmp_path.parent)  # the worker's own folder
    np.testing.assert_array_equal(np.asarray(pickle.loads(shipped).images),
                                  np.asarray(pickle.loads(images)))
    assert len(pickle.loads(shipped).index) == 7
