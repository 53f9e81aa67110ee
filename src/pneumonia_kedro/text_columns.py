"""Text columns (patient ids, CSV cells) as Arrow arrays, for tables of millions of rows.

Codes, sorted distinct values and lookups without a Python object per cell. Arrow's hash table
for millions of ids needs over twice the size of the labels file they came from, so ids are
hashed in parts split by their last character (UUIDs end in one of 16 hex digits).
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

TEXT = pd.StringDtype("pyarrow", na_value=np.nan)  # pandas' "str" (Arrow strings)
ONE_HASH_TABLE = 1 << 19  # ids hashed in one table; more are hashed in parts

try:  # glibc only: elsewhere freed memory stays with the process until it is reused
    _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):
    _MALLOC_TRIM = None


def is_text(type_: pa.DataType) -> bool:
    """True for Arrow's string types (32- or 64-bit offsets)."""
    return pa.types.is_string(type_) or pa.types.is_large_string(type_)


def arrow_text(values: pd.Series | pd.Index) -> pa.ChunkedArray:
    """The Arrow strings of a text column: those behind it, without a copy, when it has them
    (the loader's ``string[pyarrow]`` columns and pandas' "str" do)."""
    if isinstance(values.dtype, pd.StringDtype | pd.ArrowDtype):
        strings = pa.chunked_array(pa.array(values.array))
        if is_text(strings.type):
            return strings
    return pa.chunked_array(pa.array(values.astype(TEXT).array))


def release_unused() -> None:
    """Hand the memory that Arrow's and glibc's allocators keep after freeing (a hash table of
    millions of ids, a temporary array) back to the system before the next step needs some."""
    pa.default_memory_pool().release_unused()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def by_last_character(
    *arrays: pa.ChunkedArray,
) -> Iterator[list[tuple[np.ndarray, pa.ChunkedArray]]]:
    """The rows of ``arrays`` of ids in parts that share the ids' last character (one part
    when there are few ids): for each part, each array's mask of its rows and those rows."""
    if max(map(len, arrays)) <= ONE_HASH_TABLE:
        yield [(np.ones(len(array), dtype=bool), array) for array in arrays]
        return
    keys = [pc.utf8_slice_codeunits(array, -1) for array in arrays]
    characters = set().union(*(pc.unique(k).to_pylist() for k in keys))
    for key in sorted(characters, key=lambda c: (c is not None, c or "")):
        masks = [bools(pc.is_null(k) if key is None else pc.equal(k, key)) for k in keys]
        yield [(mask, array.filter(pa.array(mask))) for mask, array in zip(masks, arrays,
                                                                             strict=True)]
        release_unused()


def index_in(values: pa.ChunkedArray, value_set: pa.ChunkedArray) -> np.ndarray:
    """Each value's position in ``value_set``, -1 where it is absent (``pc.index_in``)."""
    positions = np.full(len(values), -1, dtype=np.int64)
    for (rows, part), (set_rows, part_set) in by_last_character(values, value_set):
        found = pc.index_in(part, value_set=part_set.combine_chunks())
        found = pc.fill_null(found, -1).to_numpy(zero_copy_only=False)
        hit = found >= 0
        positions[np.flatnonzero(rows)[hit]] = np.flatnonzero(set_rows)[found[hit]]
    return positions


def bools(values: pa.Array | pa.ChunkedArray, null: bool = False) -> np.ndarray:
    """An Arrow boolean column as a numpy one, nulls as ``null``."""
    return pc.fill_null(values, null).to_numpy(zero_copy_only=False)


def codes_of(values: pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """Integer codes of text values in order of first appearance (nulls too), and the values."""
    encoded = pc.dictionary_encode(values, null_encoding="encode").combine_chunks()
    return encoded.indices.to_numpy(zero_copy_only=False), encoded.dictionary


def sorted_codes(ids: pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """Each row's position among the sorted distinct ids (null last), and those ids."""
    codes = np.empty(len(ids), dtype=np.int64)
    distinct: list[pa.Array] = []
    n_distinct = 0
    for [(rows, part)] in by_last_character(ids):
        part_codes, part_distinct = codes_of(part)
        codes[rows] = part_codes + n_distinct
        n_distinct += len(part_distinct)
        distinct.append(part_distinct)
    all_distinct = pa.concat_arrays(distinct) if distinct else pa.array([], pa.string())
    order = pc.array_sort_indices(all_distinct).to_numpy()
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[codes], all_distinct.take(pa.array(order))


def pandas_text(values: pa.Array) -> pd.Series:
    """Arrow strings as a pandas "str" Series (whose 64-bit offsets are a copy of 32-bit ones)."""
    return pa.chunked_array([values]).to_pandas(
        types_mapper=lambda type_: TEXT if is_text(type_) else None)


def strictly_increasing(values: pa.ChunkedArray) -> bool:
    """True when the values are sorted and distinct."""
    n = len(values)
    return n < 2 or bool(pc.all(pc.less(values.slice(0, n - 1), values.slice(1))).as_py())
