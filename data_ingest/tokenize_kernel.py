"""Compiled (numba) inner loops of the tokenizer: one pass per cell, no per-entry Python.

`tokenize_block` computes exactly what `data_ingest.tokenize_reference.tokenize_csr_reference` defines
(same hashes, same quantile edges, same tie rule); `tests/data_ingest/test_tokenize_vectorized.py` checks it record for
record. Per cell it gathers the expressed in-vocabulary entries, sorts their values (a counting sort for
small integer counts), takes the quantile edges, keeps the `n_keep` genes with the smallest pick keys
(a bucket histogram of the keys) or, with `select_top`, the `n_keep` largest values (pick keys break ties), bins the kept values (a per-value lookup table for counts, else binary
search over the edges) and, if asked, fills the context with the
unexpressed genes of smallest pick keys. Hash arithmetic is uint64 with wrap-around, as in numpy.

A cell's entries are given as segments of (indices, data), so a SOMA read is tokenized where it lies
(`coo_segments` indexes it by row; X's gene tiles give each row one segment per tile). `tokenize_into` writes
records to caller-chosen places (the stream's read tasks: straight into shuffled-position order, closed up
afterwards by `compact_slots`); `tokenize_block` sizes them exactly first and returns new arrays.
"""

from __future__ import annotations

import numba
import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_S11, _S27, _S30, _S31 = np.uint64(11), np.uint64(27), np.uint64(30), np.uint64(31)
_COUNT_SORT_SLACK = 1024
"""A cell's values are counting-sorted when they are integers below `2 * n_values + this`."""


@numba.njit(cache=True, nogil=True, inline="always")
def _mix64(x):
    x = x ^ (x >> _S30)
    x = x * _M1
    x = x ^ (x >> _S27)
    x = x * _M2
    return x ^ (x >> _S31)


@numba.njit(cache=True, nogil=True, inline="always")
def _gene_hash(stream, token):
    return _mix64(stream ^ (np.uint64(token) * _GOLDEN))


@numba.njit(cache=True, nogil=True, inline="always")
def _run_of(r, run_ids, k):
    """Index of the run holding id `r` (run `k`, the last one used, is tried first)."""
    if run_ids[k] <= r and (k + 1 == len(run_ids) or r < run_ids[k + 1]):
        return k
    return np.searchsorted(run_ids, r, side="right") - 1


@numba.njit(cache=True, nogil=True, inline="always")
def _stretch_end(rows, e, r):
    """The end of the stretch of row `r` that starts at `rows[e]`: 16 entries at a time (one SIMD
    comparison, where the whole block is `r`), then one by one."""
    n = len(rows)
    while e + 16 <= n:
        diff = 0
        for j in range(16):
            diff |= rows[e + j] ^ r
        if diff != 0:
            break
        e += 16
    while e < n and rows[e] == r:
        e += 1
    return e


@numba.njit(cache=True, nogil=True)
def coo_segments(rows, run_ids, run_pos):
    """Index a COO read by row without moving its entries: (seg_ptr, seg_lo, seg_hi).

    A segment is a maximal stretch `rows[seg_lo[s]:seg_hi[s]]` of one row; row `i` (position `i` in the
    sorted cell ids) owns segments `seg_ptr[i] .. seg_ptr[i + 1] - 1`, in read order. X is stored in tiles
    of rows x genes, so a row arrives as one stretch per gene tile. The cell ids are given as runs of
    consecutive ids: run k covers ids `run_ids[k] ..` at positions `run_pos[k] .. run_pos[k + 1] - 1`;
    every row of the read is one of them.
    """
    n = run_pos[-1]
    # One pass over the entries lists the stretches in read order; a counting sort of the (few) stretches
    # then groups them by row, stable, so each row's stay in read order.
    cap = 2 * n + 16
    at = np.empty(cap, np.int64)
    lo = np.empty(cap, np.int64)
    hi = np.empty(cap, np.int64)
    m = 0
    k = 0
    e = 0
    while e < len(rows):
        r = rows[e]
        k = _run_of(r, run_ids, k)
        if m == cap:
            cap *= 2
            at = np.concatenate((at, np.empty(cap - m, np.int64)))
            lo = np.concatenate((lo, np.empty(cap - m, np.int64)))
            hi = np.concatenate((hi, np.empty(cap - m, np.int64)))
        at[m] = run_pos[k] + (r - run_ids[k])
        lo[m] = e
        e = _stretch_end(rows, e + 1, r)
        hi[m] = e
        m += 1
    seg_ptr = np.zeros(n + 1, np.int64)
    for j in range(m):
        seg_ptr[at[j] + 1] += 1
    for i in range(n):
        seg_ptr[i + 1] += seg_ptr[i]
    fill = seg_ptr[:-1].copy()
    seg_lo = np.empty(m, np.int64)
    seg_hi = np.empty(m, np.int64)
    for j in range(m):
        p = at[j]
        s = fill[p]
        fill[p] = s + 1
        seg_lo[s] = lo[j]
        seg_hi[s] = hi[j]
    return seg_ptr, seg_lo, seg_hi


@numba.njit(cache=True, nogil=True)
def compact_slots(genes, values, stride, slot_lengths):
    """Move the records written at `s * stride` (`slot_lengths[s]` entries each, 0 for none) down so they
    follow each other in slot order, in place; return their total length."""
    d = 0
    for s in range(len(slot_lengths)):
        a = s * stride
        m = slot_lengths[s]
        if a != d:
            for j in range(m):  # d < a: each entry is read before anything is written over it
                genes[d + j] = genes[a + j]
                values[d + j] = values[a + j]
        d += m
    return d


@numba.njit(cache=True, nogil=True)
def _values_at_edge_ranks(hist, ranks, nb, out):
    """out[j] = the value of sorted rank ranks[j] of the counts histogram `hist`, for both halves of
    `_edge_ranks` (each non-decreasing; ranks[nb + j] is ranks[j] or ranks[j] + 1), in one walk up it."""
    v = 0
    below = hist[0]
    for j in range(nb):
        while below <= ranks[j]:
            v += 1
            below += hist[v]
        out[j] = v
        w = v
        b = below
        while b <= ranks[nb + j]:
            w += 1
            b += hist[w]
        out[nb + j] = w


@numba.njit(cache=True, nogil=True)
def _edge_ranks(c, q, idx):
    """Sorted ranks whose values `np.quantile(values, q, method="linear")` of `c` values interpolates:
    idx[j] and idx[nb + j] for quantile j (non-decreasing in each half)."""
    last = c - 1
    nb = len(q)
    for j in range(nb):
        vi = last * q[j]
        prev = last if vi >= last else int(np.floor(vi))
        idx[j] = prev
        idx[nb + j] = last if vi >= last else prev + 1


@numba.njit(cache=True, nogil=True)
def _edges(c, q, vals, edges):
    """The quantile edges from the values at `_edge_ranks`, exactly as the vectorized numpy code did."""
    last = c - 1
    nb = len(q)
    for j in range(nb):
        vi = last * q[j]
        a = vals[j]
        if vi >= last:
            edges[j] = a
            continue
        b = vals[nb + j]
        gamma = vi - np.floor(vi)
        diff = b - a
        if gamma >= 0.5:
            edges[j] = b - diff * (1 - gamma)
        else:
            edges[j] = a + diff * gamma


@numba.njit(cache=True, nogil=True)
def _digitize_table(edges, vmax, left, right):
    """left[v] = #edges <= v and right[v] = #edges < v for the integers v = 0 .. vmax (edges sorted)."""
    nb = len(edges)
    j = 0
    k = 0
    for v in range(vmax + 1):
        while j < nb and edges[j] < v:
            j += 1
        if k < j:
            k = j
        while k < nb and edges[k] <= v:
            k += 1
        right[v] = j
        left[v] = k


@numba.njit(cache=True, nogil=True)
def _mid_bin_table(edges, vmax, nb, left, right):
    """left[v] = the bin of the integer v = 0 .. vmax with ties split at the middle (`tie_break: mid`;
    `right` is scratch): from `_digitize_table`'s counts, ceil(0.5 * (right - left) + left) =
    left - (left - right) // 2, clipped to 1 .. nb (what the per-entry path computes)."""
    _digitize_table(edges, vmax, left, right)
    for v in range(vmax + 1):
        left[v] = min(max(left[v] - (left[v] - right[v]) // 2, 1), nb)


@numba.njit(cache=True, nogil=True)
def _select_smallest(keys, m, k, bucket_shift, flags, hist):
    """flags[i] = key i is among the `k` smallest of keys[:m] (ties: the earlier index), for 0 < k < m.

    A histogram of the keys' top 8 bits (`bucket_shift` = key bits - 8) finds the bucket holding the k-th
    smallest key; only that bucket's few keys are sorted. `hist` is 256 zeroed ints (left zeroed).
    """
    for i in range(m):
        hist[keys[i] >> bucket_shift] += 1
    below = 0
    edge = 0
    while below + hist[edge] < k:
        below += hist[edge]
        edge += 1
    tied = np.empty(hist[edge], np.uint64)
    t = 0
    for i in range(m):
        if (keys[i] >> bucket_shift) == edge:
            tied[t] = keys[i]
            t += 1
    hist[:] = 0
    tied.sort()
    thr = tied[k - below - 1]
    eq_left = k - below
    for v in tied:
        if v < thr:
            eq_left -= 1
    for i in range(m):  # a key below thr is one of them (no branch: that is a coin flip per key)
        kv = keys[i]
        flags[i] = kv < thr
        if kv == thr and eq_left > 0:  # rare
            flags[i] = True
            eq_left -= 1


@numba.njit(cache=True, nogil=True)
def _select_largest_values(
    x, tok, stream, shift, m, k, thr, flags, keys, tied, tied_flags, bucket_shift, hist
):
    """flags[i] = value i is among the `k` largest of x[:m], for 0 < k < m, given `thr`, the k-th largest
    value. Among values equal to `thr` the smallest pick keys win (ties of keys: the earlier index), as
    `np.lexsort((keys, -x))[:k]`; only those tied genes are hashed. `keys`, `tied`, `tied_flags`: scratch."""
    above = 0
    n_tied = 0
    for i in range(m):  # no branches: which side of thr a value falls is unpredictable
        xi = x[i]
        gt = xi > thr
        flags[i] = gt
        above += gt
        tied[n_tied] = i
        n_tied += xi == thr
    for t in range(n_tied):
        keys[t] = _gene_hash(stream, tok[tied[t]]) >> shift
    need = k - above
    if need >= n_tied:
        for t in range(n_tied):
            flags[tied[t]] = True
        return
    _select_smallest(keys, n_tied, need, bucket_shift, tied_flags, hist)
    for t in range(n_tied):  # their flags were False (not above thr)
        flags[tied[t]] = tied_flags[t]


@numba.njit(cache=True, nogil=True)
def tokenize_block(
    seg_ptr,
    seg_lo,
    seg_hi,
    indices,
    data,
    feature_tokens,
    pick_streams,
    tie_streams,
    tie_mid,
    select_top,
    q,
    n_keep,
    min_genes,
    zero_fill,
    cls_id,
    pad_value,
    key_shift,
):
    """Token lists of the cells (see the module docstring). Cell `i`'s entries are
    `indices[seg_lo[s]:seg_hi[s]]` / `data[...]` for its segments `s` in `seg_ptr[i] .. seg_ptr[i + 1] - 1`
    (CSR rows are one segment each; a COO read is indexed by `coo_segments`).

    Returns (kept cell mask, int32 list offsets over kept cells, genes int32, values int16, truncated cells):
    a first pass sizes each record exactly, then `tokenize_into` writes them.
    """
    n = len(seg_ptr) - 1
    n_feat = len(feature_tokens)
    # Pass 1: expressed in-vocabulary entries per cell, and each kept cell's record length.
    cnt = np.zeros(n, np.int64)
    for i in range(n):
        c = 0
        for s in range(seg_ptr[i], seg_ptr[i + 1]):
            for e in range(seg_lo[s], seg_hi[s]):
                if data[e] > 0 and feature_tokens[indices[e]] >= 0:
                    c += 1
        cnt[i] = c
    n_cand = 0
    for j in range(n_feat):
        if feature_tokens[j] >= 0:
            n_cand += 1
    mark = np.zeros(n_feat if zero_fill else 0, np.bool_)
    keep = cnt >= min_genes
    length = np.zeros(n, np.int64)
    for i in range(n):
        if not keep[i]:
            continue
        c = cnt[i]
        extra = 0
        if zero_fill and c < n_keep:
            distinct = 0  # expressed candidate columns (a malformed row may repeat a column)
            for s in range(seg_ptr[i], seg_ptr[i + 1]):
                for e in range(seg_lo[s], seg_hi[s]):
                    j = indices[e]
                    if data[e] > 0 and feature_tokens[j] >= 0 and not mark[j]:
                        mark[j] = True
                        distinct += 1
            for s in range(seg_ptr[i], seg_ptr[i + 1]):
                for e in range(seg_lo[s], seg_hi[s]):
                    mark[indices[e]] = False
            extra = min(n_keep - c, n_cand - distinct)
        length[i] = 1 + min(c, n_keep) + extra
    n_out = 0
    for i in range(n):
        if keep[i]:
            n_out += 1
    offsets = np.zeros(n_out + 1, np.int32)
    total = 0
    r = 0
    for i in range(n):
        if keep[i]:
            total += length[i]
            offsets[r + 1] = total
            r += 1
    genes = np.empty(total, np.int32)
    values = np.empty(total, np.int16)
    starts = np.zeros(n, np.int64)
    r = 0
    for i in range(n):
        if keep[i]:
            starts[i] = offsets[r]
            r += 1
    lengths = np.empty(n, np.int64)
    truncated = tokenize_into(
        seg_ptr,
        seg_lo,
        seg_hi,
        indices,
        data,
        feature_tokens,
        pick_streams,
        tie_streams,
        tie_mid,
        select_top,
        q,
        n_keep,
        min_genes,
        zero_fill,
        cls_id,
        pad_value,
        key_shift,
        starts,
        genes,
        values,
        lengths,
    )
    return keep, offsets, genes, values, truncated


@numba.njit(cache=True, nogil=True)
def tokenize_into(
    seg_ptr,
    seg_lo,
    seg_hi,
    indices,
    data,
    feature_tokens,
    pick_streams,
    tie_streams,
    tie_mid,
    select_top,
    q,
    n_keep,
    min_genes,
    zero_fill,
    cls_id,
    pad_value,
    key_shift,
    starts,
    genes,
    values,
    lengths,
):
    """Write cell `i`'s record (same arguments as `tokenize_block`) to `genes` / `values` from `starts[i]`
    on, set `lengths[i]` (0 for a skipped cell, fewer than `min_genes` genes) and return the number of
    truncated cells. The caller sizes the room: at most `n_keep + 1` per cell. No pass over the data
    beforehand, so records can go straight to their final places."""
    n = len(seg_ptr) - 1
    nb = len(q)
    n_feat = len(feature_tokens)
    shift = np.uint64(key_shift)
    n_cand = 0
    for j in range(n_feat):
        if feature_tokens[j] >= 0:
            n_cand += 1
    mark = np.zeros(n_feat if zero_fill else 0, np.bool_)
    max_c = 0  # entries of the largest cell: a bound on its expressed genes
    for i in range(n):
        m = 0
        for s in range(seg_ptr[i], seg_ptr[i + 1]):
            m += seg_hi[s] - seg_lo[s]
        max_c = max(max_c, m)

    # Pass 2: one cell at a time, in scratch buffers sized for the largest cell.
    tok = np.empty(max_c, np.int64)
    col = np.empty(max_c, np.int64)
    x = np.empty(max_c, np.float64)
    sv = np.empty(max_c, np.float64)
    keys = np.empty(max(max_c, n_cand if zero_fill else 0), np.uint64)
    flags = np.empty(max(max_c, n_cand if zero_fill else 0), np.bool_)
    tied = np.empty(max_c if select_top else 0, np.int64)
    tied_flags = np.empty(max_c if select_top else 0, np.bool_)
    cand = np.empty(n_cand if zero_fill else 0, np.int64)
    hist = np.zeros(_COUNT_SORT_SLACK, np.int64)
    lut_left = np.empty(_COUNT_SORT_SLACK, np.int64)
    lut_right = np.empty(_COUNT_SORT_SLACK, np.int64)
    ranks = np.empty(2 * nb, np.int64)
    rank_vals = np.empty(2 * nb, np.float64)
    bucket_hist = np.zeros(256, np.int64)
    bucket_shift = np.uint64(64 - key_shift - 8)
    edges = np.empty(nb, np.float64)
    truncated = 0
    for i in range(n):
        c = 0
        vmax = 0.0
        thr_top = 0.0
        integral = True
        for s in range(seg_ptr[i], seg_ptr[i + 1]):
            for e in range(seg_lo[s], seg_hi[s]):
                t = feature_tokens[indices[e]]
                v = data[e]
                if v > 0 and t >= 0:
                    tok[c] = t
                    if zero_fill:
                        col[c] = indices[e]
                    x[c] = v
                    c += 1
                    if v > vmax:
                        vmax = v
                    if v != np.floor(v):
                        integral = False
        if c < min_genes:
            lengths[i] = 0
            continue
        out = starts[i]
        genes[out] = cls_id
        values[out] = pad_value
        out += 1
        if c == 0:
            lengths[i] = 1
            continue
        # Quantile edges: small integer counts from a histogram, anything else from a sort.
        _edge_ranks(c, q, ranks)
        counted = integral and vmax < 2 * c + _COUNT_SORT_SLACK
        if counted:
            top = int(vmax)
            if len(hist) <= top:
                hist = np.zeros(2 * top + 2, np.int64)
                lut_left = np.empty(2 * top + 2, np.int64)
                lut_right = np.empty(2 * top + 2, np.int64)
            for k in range(c):
                hist[int(x[k])] += 1
            _values_at_edge_ranks(hist, ranks, nb, rank_vals)
            if select_top and c > n_keep:  # the n_keep-th largest value, from the histogram
                acc = 0
                v = top
                while acc + hist[v] < n_keep:
                    acc += hist[v]
                    v -= 1
                thr_top = np.float64(v)
            hist[: top + 1] = 0
        else:
            sv[:c] = np.sort(x[:c])
            for j in range(2 * nb):
                rank_vals[j] = sv[ranks[j]]
            if select_top and c > n_keep:
                thr_top = sv[c - n_keep]
        _edges(c, q, rank_vals, edges)
        if counted and tie_mid:
            _mid_bin_table(edges, top, nb, lut_left, lut_right)
        elif counted:
            _digitize_table(edges, top, lut_left, lut_right)
        trunc = c > n_keep
        if trunc:
            truncated += 1
            stream = pick_streams[i]
            if select_top:
                _select_largest_values(
                    x, tok, stream, shift, c, n_keep, thr_top, flags, keys, tied, tied_flags,
                    bucket_shift, bucket_hist,
                )  # fmt: skip
            else:
                for k in range(c):
                    keys[k] = _gene_hash(stream, tok[k]) >> shift
                _select_smallest(keys, c, n_keep, bucket_shift, flags, bucket_hist)
            # Close up the kept entries in place (no branch per entry: the flags are unpredictable).
            o = 0
            for k in range(c):
                tok[o] = tok[k]
                x[o] = x[k]
                if zero_fill:
                    col[o] = col[k]
                o += flags[k]
            c = o
        tstream = tie_streams[i]
        if counted and tie_mid:  # each value's bin from the table: no per-entry search or branch
            for k in range(c):
                genes[out] = tok[k]
                values[out] = lut_left[np.int64(x[k])]
                out += 1
        else:
            for k in range(c):
                v = x[k]
                if counted:
                    left = lut_left[np.int64(v)]
                    right = lut_right[np.int64(v)]
                else:
                    # edges <= v (np.digitize's default) and edges < v (np.digitize right=True)
                    left = np.searchsorted(edges, v, side="right")
                    right = np.searchsorted(edges, v, side="left")
                if right != left:
                    if tie_mid:
                        u = 0.5
                    else:
                        u = np.float64(_gene_hash(tstream, tok[k]) >> _S11) * 2.0**-53
                    d = np.int64(np.ceil(u * (right - left) + left))
                else:
                    d = left
                genes[out] = tok[k]
                values[out] = min(max(d, 1), nb)
                out += 1
        if zero_fill and c < n_keep:
            for k in range(c):
                mark[col[k]] = True
            m = 0
            stream = pick_streams[i]
            for j in range(n_feat):
                t = feature_tokens[j]
                if t >= 0 and not mark[j]:
                    cand[m] = t
                    keys[m] = _gene_hash(stream, t) >> shift
                    m += 1
            for k in range(c):
                mark[col[k]] = False
            want = min(n_keep - c, m)
            if want >= m:
                for k in range(m):
                    flags[k] = True
            elif want > 0:
                _select_smallest(keys, m, want, bucket_shift, flags, bucket_hist)
            if want > 0:
                for k in range(m):
                    if flags[k]:
                        genes[out] = cand[k]
                        values[out] = 0
                        out += 1
        lengths[i] = out - starts[i]
    return truncated


@numba.njit(cache=True, nogil=True, inline="always")
def _uniform(h):
    """A uniform in [0, 1) from the top 53 bits of a hash."""
    return np.float64(h >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@numba.njit(cache=True, nogil=True)
def thin_segments(seg_ptr, seg_lo, seg_hi, indices, data, streams, keep, out):
    """Binomially thin cell `i`'s entries (its segments, as `tokenize_into` takes them), entry `e` with
    keep probability `keep[e]`, drawing from `streams[i]` and each entry's column only, so a cell's draw
    does not depend on which cells are read with it. A whole-number value is a count: each of its units is
    kept with probability `keep[e]` (above 64 units, a normal approximation of the binomial); any other
    value is kept whole with that probability. Writes the thinned values to `out` at the entries' places."""
    big = 64
    for i in range(len(seg_ptr) - 1):
        for s in range(seg_ptr[i], seg_ptr[i + 1]):
            for e in range(seg_lo[s], seg_hi[s]):
                v = data[e]
                p = keep[e]
                h = _gene_hash(streams[i], indices[e])
                if v <= 0:
                    out[e] = 0.0
                elif v != np.floor(v):
                    out[e] = v if _uniform(h) < p else 0.0
                elif v <= big:
                    kept = 0
                    for _ in range(int(v)):
                        h = _mix64(h + _GOLDEN)
                        if _uniform(h) < p:
                            kept += 1
                    out[e] = kept
                else:  # Box-Muller from two more draws
                    h1 = _mix64(h + _GOLDEN)
                    h2 = _mix64(h1 + _GOLDEN)
                    z = np.sqrt(-2.0 * np.log(1.0 - _uniform(h1))) * np.cos(
                        2.0 * np.pi * _uniform(h2)
                    )
                    k = np.floor(v * p + z * np.sqrt(v * p * (1.0 - p)) + 0.5)
                    out[e] = min(max(k, 0.0), v)
