"""Interoperability with the reference C implementation (FastFilter/xor_singleheader via pyfusefilter).

Both directions, 8- and 16-bit, 3-wise: a filter built by one side is queried by the other on the
keys and on 10^6 non-keys, and the answers must be identical; the allocation sizes must match.
"""

from __future__ import annotations

import numpy as np
import pytest

from deltamask.codecs.fuse import FuseFilter, FuseLayout, build_fuse_filter, fuse_layout

xf = pytest.importorskip("pyfusefilter._xorfilter")
ffi, lib = xf.ffi, xf.lib
KIND = {8: ("binary_fuse8", np.uint8), 16: ("binary_fuse16", np.uint16)}


def _c_query(prefix: str, filt: object, keys: np.ndarray) -> np.ndarray:
    contain = getattr(lib, f"{prefix}_contain")
    return np.fromiter((contain(int(x), filt) for x in keys), dtype=bool, count=keys.size)


def _c_struct(bits: int, size: int) -> object:
    prefix, _ = KIND[bits]
    f = ffi.new(f"{prefix}_t *")
    assert getattr(lib, f"{prefix}_allocate")(size, f)
    return f


@pytest.mark.parametrize("bits", [8, 16])
def test_sizes_match_reference(bits: int) -> None:
    prefix, _ = KIND[bits]
    sizes = list(range(0, 300)) + list(range(300, 200_000, 37)) + [10**6, 3 * 10**6, 10**7, 3 * 10**7]
    for size in sizes:
        f = _c_struct(bits, size)
        lay = fuse_layout(size, 3)
        got = (lay.segment_length, lay.segment_count, lay.array_length, lay.segment_count_length)
        assert got == (f.SegmentLength, f.SegmentCount, f.ArrayLength, f.SegmentCountLength), size
        getattr(lib, f"{prefix}_free")(f)


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("size", [1, 50, 20_000])
def test_membership_agrees_both_ways(bits: int, size: int) -> None:
    prefix, dt = KIND[bits]
    rng = np.random.default_rng(size + bits)
    keys = np.unique(rng.integers(0, 2**63, size, dtype=np.int64)).astype(np.uint64)
    size = keys.size
    non_keys = rng.integers(0, 2**63, 1_000_000, dtype=np.int64).astype(np.uint64)
    probes = np.concatenate([keys, non_keys])

    # C builds, we query
    cf = _c_struct(bits, size)
    assert getattr(lib, f"{prefix}_populate")(ffi.cast("uint64_t *", ffi.from_buffer(keys)), size, cf)
    fps = np.frombuffer(ffi.buffer(cf.Fingerprints, cf.ArrayLength * (bits // 8)), dtype=dt).copy()
    ours = FuseFilter(FuseLayout(3, cf.SegmentLength, cf.SegmentCount), bits, int(cf.Seed), fps)
    assert ours.layout.array_length == cf.ArrayLength
    c_ans = _c_query(prefix, cf, probes)
    assert c_ans[:size].all()
    assert np.array_equal(ours.contains(probes), c_ans)
    assert np.array_equal(ours.contains(probes, backend="numpy"), c_ans)
    getattr(lib, f"{prefix}_free")(cf)

    # we build, C queries (same seed, sizes and fingerprints copied into a C-allocated filter)
    f = build_fuse_filter(keys, 3, bits, seed=size)
    cg = _c_struct(bits, size)
    assert (cg.SegmentLength, cg.SegmentCount, cg.ArrayLength) == (
        f.layout.segment_length, f.layout.segment_count, f.layout.array_length)
    cg.Seed = f.seed
    ffi.memmove(cg.Fingerprints, f.fingerprints.tobytes(), f.fingerprints.nbytes)
    c_ans = _c_query(prefix, cg, probes)
    assert c_ans[:size].all()
    assert np.array_equal(f.contains(probes), c_ans)
    fp = c_ans[size:].mean()
    assert fp < 3 * 2.0 ** -bits + 1e-4
    getattr(lib, f"{prefix}_free")(cg)
