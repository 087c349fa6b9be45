"""Image-text retrieval metrics (recall@k) and the top-k ITM re-ranking score matrix.

References: BLIP ``train_retrieval.py`` (``evaluation`` and ``itm_eval``) and LAVIS
``lavis/tasks/retrieval.py`` ``RetrievalTask._report_metrics`` / ``compute_sim_matrix``.

Ranking (``recall_at_k``) copies the reference exactly: each row of a score matrix is ordered with
``np.argsort(score)[::-1]`` (numpy's default, non-stable sort, reversed), an image's rank is the best
(smallest) position among its ground-truth texts, a text's rank is the position of its image, and R@k is
``100.0 * #(rank < k) / n``. Tied scores therefore resolve exactly as in the reference *on the same numpy
build and dtype*: numpy's default sort is not stable and its tie order can differ between numpy versions
and CPU back ends (SIMD sorts), so equal scores may land in either order; after the ``[::-1]`` the
element numpy put last among equals comes first. The input dtype is kept as given (the reference ranks
float32 matrices). No other tie-breaking is applied.

Units: recall values are percentages (as the reference), means are plain means of those percentages.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

__all__ = [
    "FILL_VALUE",
    "i2t_ranks",
    "t2i_ranks",
    "recall_at_k",
    "topk_candidates",
    "scatter_topk_scores",
    "rerank_topk",
]

FILL_VALUE = -100.0  # score of pairs outside a query's top-k (the reference's torch.full(..., -100.0))
_NO_GT_RANK = 1e20  # the reference's initial rank: an image without ground-truth texts never counts


def _positions(score: np.ndarray) -> np.ndarray:
    """Position of every column in the reference's descending order ``np.argsort(score)[::-1]``."""
    inds = np.argsort(score)[::-1]
    pos = np.empty(inds.shape[0], dtype=np.int64)
    pos[inds] = np.arange(inds.shape[0])
    return pos  # pos[i] == np.where(inds == i)[0][0]


def i2t_ranks(scores_i2t: Any, img2txts: Any) -> np.ndarray:
    """0-based rank of the best-ranked ground-truth text of every image (float array, like the
    reference; 1e20 for an image without texts). ``img2txts[i]`` lists image i's text indices
    (a list of lists, or a dict keyed by image index as BLIP's datasets build it)."""
    scores_i2t = np.asarray(scores_i2t)
    if scores_i2t.ndim != 2:
        raise ValueError(f"scores_i2t must be [n_img, n_txt], got shape {scores_i2t.shape}")
    if len(img2txts) != scores_i2t.shape[0]:
        raise ValueError(f"img2txts has {len(img2txts)} entries for {scores_i2t.shape[0]} images")
    ranks = np.zeros(scores_i2t.shape[0])
    for index, score in enumerate(scores_i2t):
        pos = _positions(score)
        rank = _NO_GT_RANK
        for i in img2txts[index]:
            if pos[i] < rank:
                rank = pos[i]
        ranks[index] = rank
    return ranks


def t2i_ranks(scores_t2i: Any, txt2img: Any) -> np.ndarray:
    """0-based rank of every text's ground-truth image (float array, like the reference).
    ``txt2img[t]`` is text t's image index (an array/list, or a dict keyed by text index)."""
    scores_t2i = np.asarray(scores_t2i)
    if scores_t2i.ndim != 2:
        raise ValueError(f"scores_t2i must be [n_txt, n_img], got shape {scores_t2i.shape}")
    if len(txt2img) != scores_t2i.shape[0]:
        raise ValueError(f"txt2img has {len(txt2img)} entries for {scores_t2i.shape[0]} texts")
    ranks = np.zeros(scores_t2i.shape[0])
    for index, score in enumerate(scores_t2i):
        ranks[index] = _positions(score)[txt2img[index]]
    return ranks


def _recall(ranks: np.ndarray, k: int) -> float:
    return 100.0 * len(np.where(ranks < k)[0]) / len(ranks)


def recall_at_k(scores_i2t: Any, scores_t2i: Any, txt2img: Any, img2txts: Any,
                ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Recall@k in both directions, as the reference ``itm_eval`` / ``_report_metrics``.

    scores_i2t: [n_img, n_txt] (image queries), scores_t2i: [n_txt, n_img] (text queries); txt2img:
    [n_txt] image index of each text; img2txts: per image, the list of its text indices.

    Returns percentages ``txt_r{k}`` (image -> text, i.e. text retrieval) and ``img_r{k}`` (text ->
    image) for each k, ``txt_r_mean`` / ``img_r_mean`` (mean over ``ks``), ``r_mean`` (their mean), and
    ``agg_metrics`` (= ``txt_r_mean``, LAVIS's model-selection value). With the default ks the values
    are bit-identical to the reference's ``(r1 + r5 + r10) / 3``.
    """
    ks = tuple(int(k) for k in ks)
    if not ks:
        raise ValueError("ks must not be empty")
    ranks_i = i2t_ranks(scores_i2t, img2txts)
    tr = {k: _recall(ranks_i, k) for k in ks}
    ranks_t = t2i_ranks(scores_t2i, txt2img)
    ir = {k: _recall(ranks_t, k) for k in ks}
    tr_mean = sum(tr[k] for k in ks) / len(ks)
    ir_mean = sum(ir[k] for k in ks) / len(ks)
    out = {f"txt_r{k}": tr[k] for k in ks}
    out["txt_r_mean"] = tr_mean
    out.update({f"img_r{k}": ir[k] for k in ks})
    out["img_r_mean"] = ir_mean
    out["r_mean"] = (tr_mean + ir_mean) / 2
    out["agg_metrics"] = tr_mean
    return out


def topk_candidates(sim: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query (row of ``sim`` [n_q, n_c]), the k most similar candidates, best first.

    Returns (topk_idx [n_q, k] int64, topk_sim [n_q, k]); k is clipped to n_c. The result equals the
    first k columns of a stable descending sort: ties are broken towards the lower candidate index. The
    reference's ``torch.topk`` leaves tie order unspecified, which only matters when equal similarities
    straddle the k-th place. Similarities must not be NaN.
    """
    sim = np.asarray(sim)
    if sim.ndim != 2:
        raise ValueError(f"sim must be [n_queries, n_candidates], got shape {sim.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n_c = sim.shape[1]
    k = min(int(k), n_c)
    order = np.empty((sim.shape[0], k), dtype=np.int64)
    for q, row in enumerate(sim):  # per row: O(n_c) selection, no [n_q, n_c] index matrix
        thresh = np.partition(row, n_c - k)[n_c - k]  # the k-th largest value
        above = np.flatnonzero(row > thresh)
        tied = np.flatnonzero(row == thresh)[: k - above.size]  # lowest indices among the ties
        sel = np.concatenate([above, tied])
        order[q] = sel[np.lexsort((sel, -row[sel]))]  # value descending, then index ascending
    return order, np.take_along_axis(sim, order, axis=1)


def scatter_topk_scores(n_candidates: int, topk_idx: Any, topk_scores: Any,
                        fill_value: float = FILL_VALUE, dtype: Any = np.float32) -> np.ndarray:
    """Full [n_q, n_candidates] score matrix: ``fill_value`` everywhere, ``topk_scores[q, j]`` at
    ``[q, topk_idx[q, j]]`` (the reference's ``score_matrix[q, topk_idx] = score``)."""
    topk_idx = np.asarray(topk_idx)
    topk_scores = np.asarray(topk_scores)
    if topk_idx.ndim != 2 or topk_idx.shape != topk_scores.shape:
        raise ValueError(f"topk_idx {topk_idx.shape} and topk_scores {topk_scores.shape} must be the "
                         "same [n_q, k] shape")
    out = np.full((topk_idx.shape[0], int(n_candidates)), fill_value, dtype=dtype)
    np.put_along_axis(out, topk_idx, topk_scores.astype(dtype), axis=1)
    return out


def rerank_topk(sim: Any, k: int, score_fn: Callable[[np.ndarray], Any] | Any, add_sim: bool = True,
                fill_value: float = FILL_VALUE, dtype: Any = np.float32) -> np.ndarray:
    """BLIP / BLIP-2 retrieval re-ranking for one direction.

    sim: [n_q, n_c] ITC similarities (queries = rows: images for i2t, texts for t2i). For each query the
    top-k candidates by ``sim`` (``topk_candidates``) get the score ``itm + sim`` (``add_sim=True``,
    the reference's ``score + topk_sim``; ``add_sim=False`` keeps the ITM score alone); every other
    pair gets ``fill_value`` (-100). Arithmetic is done in ``dtype`` (float32 like the reference).

    score_fn: either a callable ``score_fn(topk_idx) -> [n_q, k]`` returning, at [q, j], the ITM score
    (e.g. the class-1 logit) of query q with candidate ``topk_idx[q, j]`` - the eval job computes it on
    device - or an already computed [n_q, k] array aligned with ``topk_candidates(sim, k)[0]``.
    """
    sim = np.asarray(sim)
    topk_idx, topk_sim = topk_candidates(sim, k)
    itm = score_fn(topk_idx) if callable(score_fn) else score_fn
    itm = np.asarray(itm)
    if itm.shape != topk_idx.shape:
        raise ValueError(f"ITM scores have shape {itm.shape}, expected {topk_idx.shape}")
    scores = itm.astype(dtype)
    if add_sim:
        scores = scores + topk_sim.astype(dtype)
    return scatter_topk_scores(sim.shape[1], topk_idx, scores, fill_value=fill_value, dtype=dtype)
