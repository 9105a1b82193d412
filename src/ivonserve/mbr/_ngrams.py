"""Vectorised n-gram statistics shared by the lexical utilities (numpy only).

Every candidate is turned once into a sequence of integer symbols (characters or tokens). For
each order n the n-grams of all candidates get exact integer ids (built order by order from
(id of the (n-1)-gram, next symbol) pairs, no hashing, so no collisions), and the clipped
match counts of *all* pairs, ``match[i, j] = sum_g min(c_i[g], c_j[g])``, come out of one
matrix product: ``min(a, b) = sum_{t >= 1} [a >= t][b >= t]``, so with one 0/1 column per
(n-gram g, threshold t), match[i, j] = number of columns set in both rows i and j, counted
with bit-packed rows, AND and popcount over all pairs at once. N-grams seen in only
one candidate are left out (they only add to the diagonal, which is set from the lengths).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

__all__ = ["clipped_matches", "ngram_ids", "pair_lcs", "symbols"]

# Elements per temporary block of pairwise word ANDs (bounds memory at 8 * _BLOCK_VALUES bytes).
_BLOCK_VALUES = 1 << 20


def symbols(text: str) -> np.ndarray:
    """The code points of a string as int64 (lone surrogates allowed)."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(
        np.int64
    )


def ngram_ids(seqs: Sequence[np.ndarray], max_order: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """For n = 1..max_order: (doc, gid) of every n-gram occurrence; equal gid <=> equal n-gram.

    Symbols are first renumbered 0..V-1; the id of an n-gram is then its base-V number
    (exact while V^n * n_docs < 2^62), and beyond that the (n-1)-gram ids are renumbered densely
    (np.unique) before being extended, so ids stay exact at any order.
    """
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    total = int(lengths.sum())
    empty = np.zeros(0, dtype=np.int64)
    if total == 0:
        return [(empty, empty) for _ in range(max_order)]
    codes = np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs])
    doc = np.repeat(np.arange(len(seqs), dtype=np.int64), lengths)
    end = np.repeat(np.cumsum(lengths), lengths)
    pos = np.arange(total, dtype=np.int64)
    _, unigram = np.unique(codes, return_inverse=True)
    unigram = unigram.reshape(-1).astype(np.int64)
    base = int(unigram.max()) + 1
    limit = (1 << 62) // max(1, len(seqs))
    out = []
    current = unigram  # current[p] = id of the n-gram that starts at p (for p < total - n + 1)
    bound = base  # ids in current are < bound
    for n in range(1, max_order + 1):
        if n > total:
            out.append((empty, empty))
            continue
        if n > 1:
            if bound * base >= limit:
                _, current = np.unique(current, return_inverse=True)
                current = current.reshape(-1).astype(np.int64)
                bound = int(current.max()) + 1
            current = current[:-1] * base + unigram[n - 1 :]
            bound *= base
        size = total - n + 1
        valid = pos[:size] + n <= end[:size]
        out.append((doc[:size][valid], current[valid]))
    return out


def _popcount_sum(a: np.ndarray) -> np.ndarray:
    """Number of set bits of a uint64 array, summed over the last axis (int64)."""
    if _BITWISE_COUNT is not None:
        return _BITWISE_COUNT(a).sum(axis=-1, dtype=np.int64)
    return _POPCOUNT8[a.view(np.uint8)].sum(axis=-1, dtype=np.int64)


_BITWISE_COUNT = getattr(np, "bitwise_count", None)  # numpy >= 2.0
_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _pair_overlaps(rows: np.ndarray, cols: np.ndarray, n_docs: int, n_cols: int) -> np.ndarray:
    """o[i, j] = number of columns set in both row i and row j of a sparse 0/1 matrix.

    Rows are packed into 64-bit words and all pairs are AND-ed and popcounted in blocks: exact
    integer arithmetic, no BLAS (whose threads misbehave on busy machines for such small products).
    """
    out = np.zeros((n_docs, n_docs), dtype=np.int64)
    col_block = 1 << 16
    for c0 in range(0, n_cols, col_block):
        c1 = min(n_cols, c0 + col_block)
        sel = (cols >= c0) & (cols < c1) if n_cols > col_block else slice(None)
        width = -(-(c1 - c0) // 64) * 64
        dense = np.zeros((n_docs, width), dtype=bool)
        dense[rows[sel], cols[sel] - c0] = True
        packed = np.packbits(dense, axis=1, bitorder="little").view(np.uint64)
        words = packed.shape[1]
        step = max(1, _BLOCK_VALUES // max(1, n_docs * words))
        for i0 in range(0, n_docs, step):
            i1 = min(n_docs, i0 + step)
            out[i0:i1] += _popcount_sum(packed[i0:i1, None, :] & packed[None, :, :])
    return out


def clipped_matches(doc: np.ndarray, gid: np.ndarray, n_docs: int) -> np.ndarray:
    """``m[i, j] = sum_g min(count_i(g), count_j(g))`` for all pairs, as float64 (exact ints)."""
    result = np.zeros((n_docs, n_docs), dtype=np.float64)
    if doc.size == 0:
        return result
    lengths = np.bincount(doc, minlength=n_docs).astype(np.float64)
    key = gid * n_docs + doc
    uniq, counts = np.unique(key, return_counts=True)
    gram = uniq // n_docs
    owner = uniq % n_docs
    starts = np.flatnonzero(np.r_[True, gram[1:] != gram[:-1]])
    df = np.diff(np.r_[starts, gram.size])
    run = np.repeat(np.arange(starts.size), df)
    shared = (df >= 2)[run]
    if shared.any():
        owner, counts, run = owner[shared], counts[shared], run[shared]
        # renumber the kept runs 0..R-1 and give run r max_count(r) columns (one per threshold)
        run_starts = np.flatnonzero(np.r_[True, run[1:] != run[:-1]])
        run = np.repeat(np.arange(run_starts.size), np.diff(np.r_[run_starts, run.size]))
        widths = np.maximum.reduceat(counts, run_starts)
        col_start = np.cumsum(widths) - widths
        threshold = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(
            np.cumsum(counts) - counts, counts
        )
        rows = np.repeat(owner, counts)
        cols = np.repeat(col_start[run], counts) + threshold
        result += _pair_overlaps(rows, cols, n_docs, int(widths.sum()))
    np.fill_diagonal(result, lengths)
    return result


def pair_lcs(seqs: Sequence[Sequence[int]]) -> np.ndarray:
    """Length of the longest common subsequence of every pair of int sequences (int64 matrix).

    Bit-parallel LCS (Allison-Dix / Hyyro) with Python ints as bit vectors, many lanes at once:
    lane i holds sequence i's match masks (len_i bits plus a zero guard bit that stops carries);
    one pass over sequence j's symbols updates all lanes i >= j together, so the K^2 pairs cost
    sum_j len_j big-int steps. Lanes are laid out from the top so that lanes j.. are the low bits.
    """
    k = len(seqs)
    out = np.zeros((k, k), dtype=np.int64)
    if k == 0:
        return out
    lengths = [len(s) for s in seqs]
    # lane i starts at bit offset[i]; lane k-1 lowest
    offset = [0] * k
    acc = 0
    for i in range(k - 1, -1, -1):
        offset[i] = acc
        acc += lengths[i] + 1
    masks: dict[int, int] = {}
    n_symbols = sum(lengths)
    if n_symbols:
        # per-symbol bit masks over all lanes, packed with numpy over each symbol's bit span
        flat_sym = np.fromiter((sym for s in seqs for sym in s), dtype=np.int64, count=n_symbols)
        flat_bit = np.concatenate(
            [np.arange(offset[i], offset[i] + lengths[i], dtype=np.int64) for i in range(k)]
        )
        order = np.lexsort((flat_bit, flat_sym))
        flat_sym, flat_bit = flat_sym[order], flat_bit[order]
        bounds = np.flatnonzero(np.r_[True, flat_sym[1:] != flat_sym[:-1], True]).tolist()
        for b0, b1 in itertools.pairwise(bounds):
            bits = flat_bit[b0:b1]
            low = int(bits[0]) & ~7
            span = np.zeros(int(bits[-1]) - low + 1, dtype=np.uint8)
            span[bits - low] = 1
            packed = np.packbits(span, bitorder="little").tobytes()
            masks[int(flat_sym[b0])] = int.from_bytes(packed, "little") << low
    lane_ones = 0
    for i in range(k):
        lane_ones |= ((1 << lengths[i]) - 1) << offset[i]
    lane_bounds = np.array([offset[i] for i in range(k - 1, -1, -1)] + [acc], dtype=np.int64)
    for j in range(k):
        top = offset[j] + lengths[j] + 1  # lanes j..k-1 live in bits [0, top)
        v = lane_ones & ((1 << top) - 1)
        keep = v
        for sym in seqs[j]:
            m = masks.get(sym)
            if m is None:
                continue
            u = v & m
            v = ((v + u) | (v - u)) & keep
        # zeros left in lane i (within its len_i bits) = LCS(i, j)
        n_bytes = (top + 7) // 8
        bits = np.unpackbits(
            np.frombuffer(v.to_bytes(n_bytes, "little"), dtype=np.uint8), bitorder="little"
        )[:top].astype(np.int64)
        ones = np.add.reduceat(bits, lane_bounds[: k - j]) if top else np.zeros(0, np.int64)
        # lane_bounds lists lanes k-1, k-2, ..., j from bit 0 upwards
        lanes = np.arange(k - 1, j - 1, -1)
        lcs = np.asarray(lengths, dtype=np.int64)[lanes] - ones
        out[lanes, j] = lcs
        out[j, lanes] = lcs
    return out
