"""The DICOM reader's speed, against an earlier version of it, side by side in one run.

    .venv/bin/python benchmarks/header_speed.py [--images 300] [--size 512] \\
        [--baseline REV]

Writes ``--images`` competition-like DICOMs (1024 x 1024 JPEG Baseline) and times, per image,
``decode`` as the cache build calls it (reduced for a ``--size`` cache) and ``read_header`` as
the ingest calls it, from bytes already in memory, in CPU seconds (the machines are shared),
best of three rounds. With ``--baseline``, the same calls of
``src/pneumonia_kedro/dicom/reader.py`` at that git revision (loaded from ``git show``) are
timed in the same rounds, interleaved, and the ratio is printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_dicoms  # noqa: E402

from pneumonia_kedro.dicom import reader  # noqa: E402

READER = "src/pneumonia_kedro/dicom/reader.py"


def reader_at(revision: str, folder: Path) -> ModuleType:
    """``dicom/reader.py`` as it was at ``revision``, imported as a module of its own."""
    source = subprocess.run(["git", "show", f"{revision}:{READER}"], capture_output=True,
                            text=True, check=True).stdout
    path = folder / f"reader_{revision}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"reader_{revision}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def images_per_second(call: Callable[[bytes, str], object], files: list[bytes]) -> float:
    # CPU time of this process: the 2-core machines are shared, wall time is noisier
    started = time.process_time()
    for index, data in enumerate(files):
        call(data, f"{index}.dcm")
    return len(files) / (time.process_time() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--size", type=int, default=512, help="cache size decode reduces for")
    parser.add_argument("--baseline", help="git revision of reader.py to compare with")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        write_dicoms(folder / "images", args.images)
        files = [path.read_bytes() for path in sorted((folder / "images").glob("*.dcm"))]
        readers = {"now": reader}
        if args.baseline:
            readers[args.baseline] = reader_at(args.baseline, folder)
        calls = {}
        for label, module in readers.items():
            calls[f"decode, {label}"] = (
                lambda data, n, m=module: m.decode(data, n, target_size=args.size))
            calls[f"read_header, {label}"] = module.read_header
        best = dict.fromkeys(calls, 0.0)
        for _ in range(args.rounds):  # interleaved, so that machine noise hits all alike
            for label, call in calls.items():
                best[label] = max(best[label], images_per_second(call, files))
    print(f"{len(files)} files of {sum(map(len, files)) / len(files) / 1024:.0f} KiB, "
          f"best of {args.rounds} rounds:")
    for label, speed in best.items():
        print(f"  {label:32s} {speed:8.1f} images/s  {1000 / speed:6.2f} ms/image")
    if args.baseline:
        for call in ("decode", "read_header"):
            ratio = best[f"{call}, now"] / best[f"{call}, {args.baseline}"]
            print(f"  {call}: now / {args.baseline} = {ratio:.3f}")


if __name__ == "__main__":
    main()
