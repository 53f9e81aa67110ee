"""Peak memory of reading and validating a very large labels CSV, against the file's size.

    .venv/bin/python benchmarks/labels_memory.py [--rows 3900000] [--steps]

Writes a competition-format labels file of ``--rows`` rows (RSNA's mix: 22.5 % positive
patients, 1-4 boxes each) and its class file, then, in a fresh process, measures the peak
RSS after the imports (the floor) and after loading both CSVs through the catalog datasets,
validating them and building the patient table (the ingest pipeline's first node). Prints
both, the ratio of the difference to the labels file's size, and the seconds the load,
checks and table took. ``--steps`` adds, from a second fresh process, the resident memory
after each of the node's steps.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import numpy as np

MEASURE = """
import resource, sys, time
import pandas as pd
from pneumonia_kedro.datasets import LabelsCSVDataset
from pneumonia_kedro.pipelines.ingest.nodes import validate_patients
floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
if sys.argv[1] == "ingest":
    labels = LabelsCSVDataset(filepath=sys.argv[2]).load()
    classes = LabelsCSVDataset(filepath=sys.argv[3]).load()
    patients, checks = validate_patients(labels, classes, {})
    assert len(patients) > 0
print(floor, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter() - start)
"""

# The calls validate_patients makes, one at a time: resident and peak MiB after each.
STEPS = """
import resource, sys
from pneumonia_kedro.datasets import LabelsCSVDataset
from pneumonia_kedro.labels import (
    build_patient_table, patient_targets, validate_class_info, validate_labels)


def resident():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


floor = resident()


def show(step):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"  {step:34s} {resident() - floor:6.0f} MiB (peak so far {peak - floor:6.0f})")


labels = LabelsCSVDataset(filepath=sys.argv[1]).load()
show("labels CSV loaded")
class_info = LabelsCSVDataset(filepath=sys.argv[2]).load()
show("class CSV loaded")
validated, _ = validate_labels(labels)
show("labels validated")
targets = patient_targets(validated)
show("Target per patient")
classes = validate_class_info(class_info, targets)
show("classes validated")
patients = build_patient_table(validated, classes)
show("patient table built")
"""


def write_files(folder: Path, rows: int, seed: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    boxes_per_patient = rng.choice([0, 1, 2, 3, 4], p=[0.775, 0.098, 0.122, 0.0045, 0.0005],
                                   size=rows)
    labels, classes = folder / "labels.csv", folder / "classes.csv"
    written = 0
    with labels.open("w") as out_labels, classes.open("w") as out_classes:
        out_labels.write("patientId,x,y,width,height,Target\n")
        out_classes.write("patientId,class\n")
        for n_boxes in boxes_per_patient:
            pid = str(uuid.UUID(bytes=rng.bytes(16)))
            if n_boxes == 0:
                lines, klass = [f"{pid},,,,,0\n"], "Normal"
            else:
                lines = [f"{pid},{rng.uniform(0, 500):.1f},{rng.uniform(0, 400):.1f},"
                         f"{rng.uniform(40, 500):.1f},{rng.uniform(45, 600):.1f},1\n"
                         for _ in range(n_boxes)]
                klass = "Lung Opacity"
            out_labels.writelines(lines)
            out_classes.writelines(f"{pid},{klass}\n" for _ in lines)
            written += len(lines)
            if written >= rows:
                break
    return labels, classes


def peak_rss_mib(*args: str) -> tuple[float, float, float]:
    """Peak RSS (MiB) after the imports and at the end, and the seconds the work took."""
    result = subprocess.run([sys.executable, "-c", MEASURE, *args], capture_output=True,
                            text=True, check=True)
    floor, peak, seconds = (float(v) for v in result.stdout.split())
    return floor / 1024, peak / 1024, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3_900_000)
    parser.add_argument("--steps", action="store_true",
                        help="also print the resident memory after each step of the node")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        labels, classes = write_files(Path(folder), args.rows)
        size = labels.stat().st_size / 2**20
        floor, peak, seconds = peak_rss_mib("ingest", str(labels), str(classes))
        print(f"labels file: {args.rows:,} rows, {size:.0f} MiB "
              f"(class file {classes.stat().st_size / 2**20:.0f} MiB)")
        print(f"  peak RSS, interpreter and imports   {floor:8.0f} MiB")
        print(f"  peak RSS, load + validate + table   {peak:8.0f} MiB")
        print(f"  (peak - imports) / labels file size  {(peak - floor) / size:8.1f}x")
        print(f"  load + validate + table took          {seconds:8.1f} s")
        if args.steps:
            print("resident memory above the imports, step by step:")
            subprocess.run([sys.executable, "-c", STEPS, str(labels), str(classes)],
                           check=True)


if __name__ == "__main__":
    main()
