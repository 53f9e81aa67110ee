"""A mutation fuzzer for the DICOM reader: each mutated file is read in a worker process with a
time bound and a memory bound, and may only decode or fail with ``DicomError``.

    python -m tests.faults.dicom_fuzz --mutations 5000 --seed 1   # the full run

``tests/faults/test_dicom_fuzz.py`` runs a few hundred mutations as part of ``make test``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

# Worker address space: far above what one 1024x1024 file needs (tens of MB), far below the
# machine, so an allocation sized by a mutated header fails instead of swapping.
MEMORY_LIMIT_BYTES = 3 * 1024**3
SEED_SYNTAXES = [
    "MR_small.dcm",                # native 16-bit
    "MR_small_RLE.dcm",            # RLE
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_jp2klossless.dcm",
    "JPGExtended.dcm",             # 12-bit JPEG, non-square
    "image_dfl.dcm",               # deflated
]


def seed_files() -> dict[str, bytes]:
    """Two competition-like demo files (the fast path) and pydicom's files of other syntaxes."""
    from pydicom.data import get_testdata_file

    from pneumonia_kedro.demo import DemoConfig
    from tests.demo_folder import write_demo_folder

    seeds = {}
    with tempfile.TemporaryDirectory() as folder:
        write_demo_folder(Path(folder), DemoConfig(n_positive=1, n_negative=1, n_test=0, seed=5))
        for path in sorted(Path(folder).glob("*.dcm")):
            seeds[f"competition-{path.stem[:8]}"] = path.read_bytes()
    for name in SEED_SYNTAXES:
        seeds[name] = Path(get_testdata_file(name)).read_bytes()
    return seeds


def mutate(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    """One random mutation of ``data``; returns its kind and the mutated bytes."""
    buffer = bytearray(data)
    n = len(buffer)
    kind = rng.choice(["bit_flips", "byte_overwrite", "truncate", "insert", "delete",
                       "length_field", "duplicate", "header_bytes"])
    if kind == "bit_flips":
        for _ in range(int(rng.integers(1, 32))):
            position = int(rng.integers(0, n))
            buffer[position] ^= 1 << int(rng.integers(0, 8))
    elif kind == "byte_overwrite":
        start = int(rng.integers(0, n))
        length = int(rng.integers(1, 64))
        buffer[start:start + length] = rng.bytes(length)
    elif kind == "truncate":
        del buffer[int(rng.integers(0, n)):]
    elif kind == "insert":
        position = int(rng.integers(0, n))
        buffer[position:position] = rng.bytes(int(rng.integers(1, 512)))
    elif kind == "delete":
        start = int(rng.integers(0, n))
        del buffer[start:start + int(rng.integers(1, 512))]
    elif kind == "length_field":
        # Element lengths and the image size drive allocations: try the extremes.
        position = int(rng.integers(128, min(n, 2048)))
        width = int(rng.choice([2, 4]))
        value = int(rng.choice([0, 1, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF,
                                int(rng.integers(0, 2**32))]))
        buffer[position:position + width] = (value % 2**(8 * width)).to_bytes(width, "little")
    elif kind == "duplicate":
        start = int(rng.integers(0, n))
        chunk = buffer[start:start + int(rng.integers(1, 1024))]
        position = int(rng.integers(0, n))
        buffer[position:position] = chunk
    else:  # header_bytes: the meta information and first elements, where parsing decides
        for _ in range(int(rng.integers(1, 8))):
            buffer[int(rng.integers(128, min(n, 600)))] = int(rng.integers(0, 256))
    return str(kind), bytes(buffer)


def _peak_rss_mib() -> float:
    """This process's resident-set high-water mark (VmHWM: unlike getrusage's maxrss it does
    not inherit the parent's, which a spawned worker would otherwise report)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _worker(connection: Connection) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    import warnings

    warnings.simplefilter("ignore")  # libraries warn about damage; the outcome is what counts
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)  # and libjpeg prints "Corrupt JPEG data" for each damaged frame
    from pneumonia_kedro.dicom import decode, read_header
    from pneumonia_kedro.errors import DicomError

    connection.send("ready")
    while True:
        name, data = connection.recv()
        outcome = "decoded"
        try:
            read_header(data, name)
            image = decode(data, name, target_size=256)
            assert image.pixels.dtype == np.uint8 and image.pixels.ndim == 2
        except DicomError as error:
            outcome = "DicomError" if str(error).startswith(f"{name}: ") else \
                f"DicomError without the file name: {error}"
        except BaseException as error:  # noqa: BLE001 - anything else is what we hunt
            outcome = f"{type(error).__name__}: {str(error)[:200]}"
        connection.send((outcome, _peak_rss_mib()))


@dataclass
class FuzzReport:
    outcomes: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)  # crashes, hangs and dead workers
    slowest_seconds: float = 0.0
    peak_worker_mib: float = 0.0
    peak_file: str = ""
    seconds: float = 0.0

    @property
    def mutations(self) -> int:
        return sum(self.outcomes.values())


class _Worker:
    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_worker, args=(child,), daemon=True)
        self.process.start()
        if not self.connection.poll(120):
            raise RuntimeError("the fuzz worker did not start")
        self.connection.recv()

    def stop(self) -> None:
        self.process.kill()
        self.process.join()


def run_fuzz(mutations: int, seed: int = 0, per_file_seconds: float = 10.0,
             total_seconds: float | None = None) -> FuzzReport:
    """Read ``mutations`` mutated files; stop early after ``total_seconds``."""
    rng = np.random.default_rng(seed)
    seeds = seed_files()
    names = sorted(seeds)
    report = FuzzReport()
    started = time.perf_counter()
    worker = _Worker()
    try:
        for number in range(mutations):
            if total_seconds is not None and time.perf_counter() - started > total_seconds:
                break
            source = names[int(rng.integers(0, len(names)))]
            kind, data = mutate(seeds[source], rng)
            name = f"/fuzz/{number:05d}-{source}.dcm"
            report.kinds[kind] += 1
            sent = time.perf_counter()
            try:
                worker.connection.send((name, data))
                answered = worker.connection.poll(per_file_seconds)
                result = worker.connection.recv() if answered else None
            except (EOFError, BrokenPipeError, ConnectionResetError):
                result, answered = None, True
            elapsed = time.perf_counter() - sent
            report.slowest_seconds = max(report.slowest_seconds, elapsed)
            if result is None:
                outcome = "hang" if not answered else \
                    f"worker died (exit code {worker.process.exitcode})"
                worker.stop()
                worker = _Worker()
            else:
                outcome, peak = result
                if peak > report.peak_worker_mib:
                    report.peak_worker_mib, report.peak_file = peak, f"{name} ({kind})"
            category = outcome if outcome in ("decoded", "DicomError") else "failure"
            report.outcomes[category] += 1
            if category == "failure":
                report.failures.append(f"{name} ({kind}): {outcome}")
                failed = Path(tempfile.gettempdir()) / "dicom-fuzz-failures"
                failed.mkdir(exist_ok=True)
                (failed / Path(name).name).write_bytes(data)
    finally:
        worker.stop()
    report.seconds = time.perf_counter() - started
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutations", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--per-file-seconds", type=float, default=10.0)
    parser.add_argument("--total-seconds", type=float, default=1800.0)
    args = parser.parse_args(argv)
    report = run_fuzz(args.mutations, args.seed, args.per_file_seconds, args.total_seconds)
    print(f"{report.mutations} mutated files in {report.seconds:.0f} s "
          f"(seed {args.seed}): {dict(report.outcomes)}")
    print(f"mutations: {dict(report.kinds)}")
    print(f"slowest file {report.slowest_seconds:.2f} s (bound {args.per_file_seconds} s); "
          f"worker peak RSS {report.peak_worker_mib:.0f} MiB "
          f"(address-space bound {MEMORY_LIMIT_BYTES / 1024**3:.0f} GiB), reached at "
          f"{report.peak_file}")
    for failure in report.failures:
        print("FAILURE", failure)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
