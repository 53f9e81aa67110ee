"""A short run of the DICOM fuzzer (the full run: ``python -m tests.faults.dicom_fuzz``)."""

from __future__ import annotations

import os

import pytest

from tests.faults.dicom_fuzz import mutate, run_fuzz, seed_files


@pytest.mark.slow
def test_mutated_files_decode_or_fail_with_a_dicom_error_in_bounded_time_and_memory():
    mutations = int(os.environ.get("FUZZ_MUTATIONS", "1500"))
    report = run_fuzz(mutations, seed=int(os.environ.get("FUZZ_SEED", "0")),
                      per_file_seconds=10.0)
    assert report.failures == []
    assert report.mutations == mutations
    assert report.outcomes["DicomError"] > 0 and report.outcomes["decoded"] > 0
    assert report.peak_worker_mib < 1024


def test_mutations_are_reproducible_from_the_seed():
    import numpy as np

    seed = seed_files()["MR_small.dcm"]
    first = [mutate(seed, np.random.default_rng(3)) for _ in range(1)]
    again = [mutate(seed, np.random.default_rng(3)) for _ in range(1)]
    assert first == again and first[0][1] != seed
