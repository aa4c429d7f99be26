"""Data validation (ppl_switch.data.as_sequence_data): ragged trials passed as lists, as users pass them."""

import numpy as np
import pytest

from ppl_switch.data import DataError, as_sequence_data


def _ragged(seed=0):
    rng = np.random.default_rng(seed)
    lengths = [7, 4, 6]
    y = [rng.normal(size=(n, 3)) for n in lengths]
    mask = [rng.random((n, 3)) > 0.3 for n in lengths]
    for m in mask:
        m[0] = True  # every trial keeps an observed entry
    return y, mask, lengths


def test_a_ragged_mask_list_equals_the_padded_arrays():
    """y and mask as lists of (time_i, dim) arrays give the same SequenceData as the padded arrays with lengths
    (the mask's own padding is unobserved, not an error)."""
    y, mask, lengths = _ragged()
    T = max(lengths)
    y_pad, mask_pad = np.zeros((3, T, 3)), np.zeros((3, T, 3), bool)
    for b, n in enumerate(lengths):
        y_pad[b, :n], mask_pad[b, :n] = y[b], mask[b]
    from_lists = as_sequence_data(y, mask=mask)
    from_arrays = as_sequence_data(y_pad, mask=mask_pad, lengths=lengths)
    np.testing.assert_array_equal(from_lists.mask, from_arrays.mask)
    np.testing.assert_array_equal(from_lists.mask, mask_pad)
    np.testing.assert_array_equal(from_lists.lengths, lengths)
    np.testing.assert_array_equal(np.where(from_lists.mask, from_lists.y, 0), np.where(mask_pad, y_pad, 0))


def test_a_ragged_mask_list_of_other_lengths_is_refused_naming_mask():
    y, mask, _ = _ragged()
    mask[1] = np.ones((5, 3), bool)  # trial 1 of y has 4 steps
    with pytest.raises(DataError, match=r"mask: a list of trials of lengths \[7, 5, 6\], but the trials of y have lengths \[7, 4, 6\]"):
        as_sequence_data(y, mask=mask)
