"""The one library-size normalisation every task, baseline and evaluation uses."""

import numpy as np
import scipy.sparse as sp

from scgpt_dist.preprocess import log_normalize


def test_counts_are_normalised_per_cell_then_log1p():
    counts = np.array([[1.0, 3.0, 0.0], [0.0, 0.0, 0.0], [2.0, 2.0, 4.0]])
    out = log_normalize(sp.csr_matrix(counts), target_sum=8.0)
    assert sp.isspmatrix_csr(out) and out.dtype == np.float64
    expected = np.log1p(counts / np.maximum(counts.sum(1, keepdims=True), 1e-12) * 8.0)
    np.testing.assert_allclose(out.toarray(), expected)  # the empty cell stays zero
    np.testing.assert_allclose(
        log_normalize(counts, target_sum=8.0).toarray(), expected
    )  # dense input


def test_values_that_are_not_counts_are_taken_as_normalised():
    logged = np.array([[0.5, 1.25], [2.0, 0.0]])
    np.testing.assert_array_equal(log_normalize(logged).toarray(), logged)
