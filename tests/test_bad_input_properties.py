"""Property-based bad input (issue 13 item 6): any number for any option, any canvas size,
any mask array. Each either passes and lies in the documented range, or is refused with a
one-line InputError naming the field; nothing else escapes and nothing hangs."""

import mlx_edit  # noqa: F401  (loads OpenBLAS before mlx)

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mlx_edit.imaging import masks
from mlx_edit.imaging.images import InputError, load_mask
from mlx_edit.options import MAX_MASK_PX, EditOptions, check_canvas

ANY = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(), st.none(), st.text(max_size=3),
    st.sampled_from([0, 1, -1, 0.5, 2**32 - 1, 2**32, 1024, 1025, 16384, 16385, 100.0, 1e-300]),
)
# field -> (integer?, low, high, low end open?)
RANGES = {
    "steps": (True, 1, 1000, False), "seed": (True, 0, 2**32 - 1, False),
    "num_images": (True, 1, 64, False), "max_sequence_length": (True, 1, 512, False),
    "left": (True, 0, 16384, False), "overlap": (True, 0, 16384, False),
    "guidance": (False, 0.0, 100.0, False), "strength": (False, 0.0, 1.0, True),
    "grow_mask": (False, 0.0, 1024.0, False), "feather": (False, 0.0, 1024.0, False),
    "canny_high": (False, 50.0, 1000.0, False),  # >= canny_low, 50 by default
}


def _fits(value, integer, lo, hi, open_low):
    if isinstance(value, bool):
        return False
    if integer:
        return isinstance(value, int) and lo <= value <= hi
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return (value > lo if open_low else value >= lo) and value <= hi


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(sorted(RANGES)), value=ANY)
def test_any_number_is_in_range_or_refused_by_name(name, value):
    integer, lo, hi, open_low = RANGES[name]
    if value is None and name in ("guidance", "steps"):
        assert getattr(EditOptions(**{name: None}), name) is None  # the variant's default
        return
    try:
        opts = EditOptions(**{name: value})
    except InputError as e:
        assert "\n" not in str(e) and str(e).startswith("canny" if "canny" in name else name)
        assert not _fits(value, integer, lo, hi, open_low)
        return
    got = getattr(opts, name)
    assert _fits(value, integer, lo, hi, open_low), (name, value)
    assert type(got) is (int if integer else float) and got == value


@settings(max_examples=200, deadline=None)
@given(w=st.integers(1, 10**6), h=st.integers(1, 10**6), gb=st.integers(1, 512))
def test_canvas_sizes(w, h, gb):
    from PIL import Image

    available = gb * 10**9
    limit = Image.MAX_IMAGE_PIXELS or 2 * 89_478_485
    try:
        check_canvas(w, h, available)
    except InputError as e:
        assert "\n" not in str(e) and f"{w}x{h}" in str(e)
        assert w * h > limit or w * h * 48 > available
        return
    assert w * h <= limit and w * h * 48 <= available


MASK_DTYPES = st.sampled_from([np.bool_, np.uint8, np.uint16, np.int32, np.int64, np.float32,
                               np.float64])
MASK_SHAPES = st.one_of(hnp.array_shapes(min_dims=2, max_dims=2, max_side=12),
                        st.tuples(st.integers(1, 12), st.integers(1, 12), st.integers(1, 6)),
                        hnp.array_shapes(min_dims=1, max_dims=4, max_side=4))


@settings(max_examples=300, deadline=None)
@given(array=hnp.arrays(MASK_DTYPES, MASK_SHAPES))
def test_any_mask_array_is_a_unit_mask_or_refused(array):
    try:
        m = load_mask(array)
    except InputError as e:
        assert "\n" not in str(e) and "mask" in str(e)
        return
    assert m.dtype == np.float32 and m.ndim == 2 and m.shape == array.shape[:2]
    assert np.isfinite(m).all() and m.min() >= 0 and m.max() <= 1 and (m >= 0.5).any()


@settings(max_examples=20, deadline=None)
@given(grow=st.floats(0, MAX_MASK_PX), feather=st.floats(0, MAX_MASK_PX),
       side=st.integers(8, 96))
def test_largest_grow_and_feather_finish_quickly(grow, feather, side):
    """Any radius within the bounds completes (the disc dilation's cost is bounded by the
    image, not the radius) and gives finite weights."""
    mask = np.zeros((side, side), np.float32)
    mask[side // 3: side // 2, side // 3: side // 2] = 1
    blend = masks.blend_mask(mask, grow, feather)
    assert blend.shape == mask.shape and np.isfinite(blend).all()
