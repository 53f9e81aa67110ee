"""The demo generator writes valid competition-like DICOMs, reproducibly."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.uid import JPEGBaseline8Bit

from pneumonia_kedro.config import ConfigError, from_params
from pneumonia_kedro.datasets import PackageTableDataset
from pneumonia_kedro.demo import (
    STYLES,
    DemoConfig,
    demo_file,
    render_chest,
    sample_demo_patients,
)
from pneumonia_kedro.dicom import decode, read_header

CONFIG = DemoConfig(n_positive=4, n_negative=4, n_test=2, seed=3)


@pytest.fixture(scope="module")
def reference_tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    labels = PackageTableDataset(package="torchxrayvision",
                                 resource="data/kaggle_stage_2_train_labels.csv.zip").load()
    headers = PackageTableDataset(
        package="torchxrayvision",
        resource="data/kaggle_stage_2_train_images_dicom_headers.csv.gz",
        load_args={"usecols": ["PatientID", "PatientAge", "PatientSex", "PixelSpacing",
                               "ViewPosition"]},
    ).load()
    return labels, headers


@pytest.fixture(scope="module")
def sampled(reference_tables):
    return sample_demo_patients(*reference_tables, CONFIG)


def test_real_patients_keep_their_real_boxes_and_headers(reference_tables, sampled):
    real_labels, real_headers = reference_tables
    labels, train, test = sampled
    assert (train["Target"] == 1).sum() == 4 and (train["Target"] == 0).sum() == 4
    assert not set(train["patientId"]) & set(test["patientId"])
    for pid in train.loc[train["Target"] == 1, "patientId"]:
        real = real_labels.loc[real_labels["patientId"] == pid, ["x", "y", "width", "height"]]
        ours = labels.loc[labels["patientId"] == pid, ["x", "y", "width", "height"]]
        np.testing.assert_array_equal(real.to_numpy(float), ours.to_numpy(float))
    header = real_headers.set_index("PatientID").loc[train["patientId"].iloc[0]]
    assert train["view_position"].iloc[0] == header["ViewPosition"]
    assert set(train.loc[train["Target"] == 1, "detailed_class"]) == {"Lung Opacity"}
    assert set(train.loc[train["Target"] == 0, "detailed_class"]) <= {
        "Normal", "No Lung Opacity / Not Normal"}


def test_without_reference_tables_it_samples_from_fitted_distributions():
    labels, train, _ = sample_demo_patients(None, None, CONFIG)
    boxes = labels.loc[labels["Target"] == 1]
    assert len(train) == 8 and 4 <= len(boxes) <= 16
    assert (boxes["x"] >= 0).all() and (boxes["x"] + boxes["width"] <= 1024).all()
    assert (boxes["y"] >= 0).all() and (boxes["y"] + boxes["height"] <= 1024).all()


def test_files_are_competition_dicoms(sampled):
    _, train, _ = sampled
    row = train.loc[train["Target"] == 1].iloc[0].to_dict()
    data = demo_file(row["patientId"], row, row["boxes"], CONFIG)
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert (ds.Rows, ds.Columns, ds.SamplesPerPixel) == (1024, 1024, 1)
    assert ds.PhotometricInterpretation == "MONOCHROME2"
    assert (ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation) == (8, 8, 0)
    assert (ds.Modality, ds.BodyPartExamined) == ("CR", "CHEST")
    assert ds.PatientID == row["patientId"] == str(ds.PatientName)
    assert ds.ViewPosition == row["view_position"]
    assert 100_000 < len(data) < 400_000
    # pydicom's own decoder agrees with the fast path within JPEG decoder rounding.
    reference = ds.pixel_array
    ours = decode(data, "demo.dcm").pixels
    assert reference.shape == ours.shape == (1024, 1024)
    assert np.abs(reference.astype(int) - ours.astype(int)).max() <= 1
    header = read_header(data, "demo.dcm")
    assert header["view_position"] == row["view_position"]
    assert header["patient_age"] == float(row["patient_age"])


def test_same_seed_gives_byte_identical_files(sampled):
    _, train, _ = sampled
    row = train.iloc[0].to_dict()
    assert demo_file(row["patientId"], row, row["boxes"], CONFIG) == demo_file(
        row["patientId"], row, row["boxes"], CONFIG)
    other = DemoConfig(**{**CONFIG.__dict__, "seed": 4})
    assert demo_file(row["patientId"], row, row["boxes"], other) != demo_file(
        row["patientId"], row, row["boxes"], CONFIG)


def test_opacity_is_brighter_inside_boxes_and_views_differ():
    box = [300.0, 300.0, 200.0, 260.0]
    with_box = render_chest("p", "PA", [box], seed=1).astype(float)
    without = render_chest("p", "PA", [], seed=1).astype(float)
    inside = (slice(330, 530), slice(320, 480))
    assert with_box[inside].mean() > without[inside].mean() + 20
    outside = (slice(0, 200), slice(0, 1024))
    assert abs(with_box[outside].mean() - without[outside].mean()) < 3
    ap = render_chest("p", "AP", [], seed=1).astype(float)
    assert np.abs(ap - without).mean() > 5


def test_harder_demo_has_fainter_opacities_and_the_things_a_detector_must_ignore():
    box = [300.0, 300.0, 200.0, 260.0]
    inside = (slice(330, 530), slice(320, 480))
    contrast = []
    for difficulty in (0.0, 0.5, 1.0):
        with_box = render_chest("p", "PA", [box], seed=1, difficulty=difficulty)
        without = render_chest("p", "PA", [], seed=1, difficulty=difficulty,
                               detailed_class="Normal")
        contrast.append(with_box[inside].astype(float).mean()
                        - without[inside].astype(float).mean())
        if difficulty == 0:  # difficulty 0 draws nothing new: the files stay as they were
            np.testing.assert_array_equal(with_box, render_chest("p", "PA", [box], seed=1))
    assert contrast[0] > contrast[1] > contrast[2] > 2
    # Per-image exposure and body position differ between patients at difficulty > 0 only.
    means = [render_chest(f"q{i}", "PA", [], seed=1, difficulty=1.0).mean() for i in range(6)]
    plain = [render_chest(f"q{i}", "PA", [], seed=1).mean() for i in range(6)]
    assert np.std(means) > 3 * np.std(plain)
    # "No Lung Opacity / Not Normal" negatives carry other findings; "Normal" ones do not.
    normal = render_chest("r", "PA", [], seed=1, difficulty=0.8, detailed_class="Normal")
    not_normal = render_chest("r", "PA", [], seed=1, difficulty=0.8,
                              detailed_class="No Lung Opacity / Not Normal")
    assert np.abs(not_normal.astype(float) - normal).max() > 20
    # Markers and devices: sharp bright pixels that the same easy film lacks.
    def bright(difficulty: float, i: int) -> int:
        image = render_chest(f"m{i}", "PA", [], seed=1, difficulty=difficulty).astype(float)
        edges = np.abs(np.diff(image, axis=1))
        return int((edges > 40).sum())

    assert any(bright(1.0, i) > bright(0.0, i) + 50 for i in range(6))
    with pytest.raises(Exception, match="difficulty"):
        from_params(DemoConfig, {"difficulty": 1.5}, "demo_data")


def test_the_render_node_yields_files_in_chunks_that_the_folder_dataset_writes(
        sampled, tmp_path, monkeypatch):
    from pneumonia_kedro.datasets import DicomFolderDataset
    from pneumonia_kedro.pipelines.demo_data import nodes

    _, train, _ = sampled
    params = {**CONFIG.__dict__}
    monkeypatch.setattr(nodes, "RENDER_CHUNK", 3)
    chunks = list(nodes.render_images(train, params))
    assert [len(chunk) for chunk in chunks] == [3, 3, 2]
    assert [chunk.last for chunk in chunks] == [False, False, True]
    first = train.iloc[0].to_dict()
    assert chunks[0][first["patientId"]] == demo_file(first["patientId"], first,
                                                      first["boxes"], CONFIG)
    dataset = DicomFolderDataset(path=str(tmp_path / "images"), overwrite=True)
    (tmp_path / "images").mkdir()
    (tmp_path / "images/earlier-larger-generation.dcm").write_bytes(b"stale")
    for chunk in chunks:  # as Kedro saves a generator node's chunks
        dataset.save(chunk)
    folder = dataset.load()
    assert sorted(folder.patient_ids) == sorted(train["patientId"])
    assert folder.read_bytes(first["patientId"]) == chunks[0][first["patientId"]]
    assert not list((tmp_path / "images").glob("*.partial*"))
    # No patients: still one (empty) chunk, so Kedro saves the output.
    assert list(nodes.render_images(train.iloc[:0], params)) == [{}]
    assert next(nodes.render_images(train.iloc[:0], params)).last
    # An exact multiple of the chunk: its own last chunk is marked, with no empty one after.
    assert [chunk.last for chunk in nodes.render_images(train.iloc[:6], params)] == [False, True]


# sha256 of today's generator's output (before styles existed), seed 7, one positive patient.
# The file's hash also pins Pillow's JPEG encoder; the pixels' hash pins the renderer alone.
CLASSIC_FILE_SHA256 = "8cb1431d5001e4b11160e5b79c4b3b00f007af37af6ec48342ae8c18ae5d620f"
CLASSIC_PIXELS_SHA256 = "a6e9e020dd46ec38edf9363d13318250a07cbe5b6d3dda04ab69164258ab35a4"


def test_style_is_validated_naming_the_key_and_the_allowed_values():
    assert from_params(DemoConfig, {"style": "patchy"}, "demo_data").style == "patchy"
    assert DemoConfig().style == "classic"
    with pytest.raises(ConfigError, match=r"demo_data\.style = 'glassy'.*'ground_glass'"):
        from_params(DemoConfig, {"style": "glassy"}, "demo_data")
    with pytest.raises(ValueError, match=r"'glassy' is not a demo style.*'consolidation'"):
        render_chest("p", "PA", [], seed=1, size=64, style="glassy")


def test_classic_style_is_the_generator_before_styles_byte_for_byte():
    config = DemoConfig(n_positive=1, n_negative=0, n_test=0, seed=7)
    _, patients, _ = sample_demo_patients(None, None, config)
    row = patients.iloc[0].to_dict()
    assert row["boxes"] and row["view_position"] == "AP"
    data = demo_file(row["patientId"], row, row["boxes"], config)
    assert hashlib.sha256(data).hexdigest() == CLASSIC_FILE_SHA256
    pixels = render_chest("p", "PA", [[300.0, 300.0, 200.0, 260.0]], seed=1, style="classic")
    assert hashlib.sha256(pixels.tobytes()).hexdigest() == CLASSIC_PIXELS_SHA256


def test_styles_change_the_pixels_but_never_the_labels():
    base = DemoConfig(n_positive=3, n_negative=3, n_test=2, seed=5, difficulty=0.6)
    tables = {name: sample_demo_patients(None, None, DemoConfig(**{**base.__dict__,
                                                                   "style": name}))
              for name in STYLES}
    for labels, train, test in tables.values():
        pd.testing.assert_frame_equal(labels, tables["classic"][0])
        pd.testing.assert_frame_equal(train, tables["classic"][1])
        pd.testing.assert_frame_equal(test, tables["classic"][2])
    box = [[75.0, 75.0, 50.0, 65.0]]
    films = {name: render_chest("p", "PA", box, seed=1, size=256, style=name).astype(float)
             for name in STYLES}
    names = list(films)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            assert np.abs(films[first] - films[second]).mean() > 5, (first, second)
        # The same style and seed give the same pixels.
        np.testing.assert_array_equal(films[first], render_chest("p", "PA", box, seed=1,
                                                                 size=256, style=first))


@pytest.mark.parametrize("style", list(STYLES))
def test_every_style_shows_the_opacity_and_difficulty_still_makes_it_fainter(style):
    box = [[75.0, 75.0, 50.0, 65.0]]
    inside = (slice(82, 132), slice(80, 120))
    top = (slice(0, 50), slice(0, 256))  # far from the box
    contrast = []
    for difficulty in (0.0, 0.5, 1.0):
        with_box = render_chest("p", "PA", box, seed=1, size=256, difficulty=difficulty,
                                style=style).astype(float)
        without = render_chest("p", "PA", [], seed=1, size=256, difficulty=difficulty,
                               detailed_class="Normal", style=style).astype(float)
        contrast.append(with_box[inside].mean() - without[inside].mean())
        assert abs(with_box[top].mean() - without[top].mean()) < 3
    assert contrast[0] > 15, contrast  # clearly visible at difficulty 0 (patchy: about 22)
    assert contrast[0] > contrast[1] > contrast[2] > 2, contrast


def test_the_render_node_uses_the_style_parameter(sampled):
    from pneumonia_kedro.pipelines.demo_data import nodes

    _, train, _ = sampled
    row = train.loc[train["Target"] == 1].iloc[0].to_dict()
    params = {**CONFIG.__dict__, "style": "consolidation"}
    (chunk,) = nodes.render_images(train.loc[train["patientId"] == row["patientId"]], params)
    styled = DemoConfig(**params)
    assert chunk[row["patientId"]] == demo_file(row["patientId"], row, row["boxes"], styled)
    assert chunk[row["patientId"]] != demo_file(row["patientId"], row, row["boxes"], CONFIG)
