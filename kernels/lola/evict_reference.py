"""LoLA eviction in plain PyTorch: the specification the Triton eviction (``evict_triton.py``) is tested
against, and the CPU path. When a chunk closes, the pairs leaving the window and the cached pairs are
scored, the best G stay in the sparse cache and the rest are folded into the hidden state (the memory's
tensors are described in ``reference.py``). Out-of-place, like ``reference.py``.
"""

from __future__ import annotations

import torch
from lola_chat.kernels.lola.reference import accumulator, expand_heads, frame, hedgehog, linear_products

SRE_EPS = 1e-6
# Keys whose products with each other sum exactly in float64 (short of magnitudes 2^29 apart), in any
# order: a nearest-key search kept between evictions picks what a full search picks only for these.
EXACT_KEY_DTYPES = (torch.bfloat16, torch.float16)
# Eviction policies that score by recall error: the self-recall error ("sre", the method); the smaller of
# it and the cache-recall error ("novelty", which also folds pairs the cache would hold twice); either with
# the self-recall error relative to the value's norm ("relative-"), which ranks a pair by the share of it
# that H fails to recall rather than by its size. The cache-recall error stays a distance: under
# "relative-novelty" it decides only where it falls below that share (near-twins, small values), so
# digits of one number, alike but not equal, are no longer called redundant. Before anything is folded
# every relative error is 1, and ties keep the earlier pair.
RECALL_POLICIES = ("sre", "novelty", "relative-sre", "relative-novelty")


def _take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x.gather(2, index[..., None].expand(..., D))``, as one index_select over flattened rows: on a
    CPU, gather with an expanded index walks every element's index, index_select copies whole rows."""
    batch, heads, rows, dim = x.shape
    base = torch.arange(batch * heads, device=x.device).view(batch, heads, 1) * rows
    picked = x.reshape(batch * heads * rows, dim).index_select(0, (index + base).flatten())
    return picked.view(batch, heads, index.shape[-1], dim)


def self_recall_error(phi_k: torch.Tensor, v: torch.Tensor, h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """|| v - H^T phi(k) / (s^T phi(k)) || per pair.

    phi_k: (B, Hq, N, F) fp32; v: (B, Hq, N, D); h: (B, Hq, F, D); s: (B, Hq, F). Returns (B, Hq, N).
    An empty hidden state (s = 0) recalls nothing, so the error is ||v||.
    """
    recalled, norm = linear_products(phi_k, h, s)
    recalled = recalled / norm.clamp_min(SRE_EPS)
    return torch.linalg.vector_norm(v.to(recalled.dtype) - recalled, dim=-1)


def nearest_keys(
    k: torch.Tensor, valid: torch.Tensor, known: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each candidate, the valid candidate j != i whose key is nearest to k_i (Euclidean; the first
    of equal ones), and ||k_j||^2 - 2 k_i . k_j, which orders row i's candidates as their distances do.

    k: (B, H, N, D) un-rotated, the cache's G slots then the leaving chunk's N - G; valid: (N,) bool.
    ``known``: (index, distance) (B, H, G) of each cache slot's nearest valid other cache slot, as
    ``nearest_after_eviction`` left them; then only the distances to and from the leaving chunk are
    computed, a C / N share of the full (N, N) search. For 16-bit keys (``EXACT_KEY_DTYPES``) the
    products run in float64, where their sums are exact whatever their order, so the two ways pick the
    same candidate; other keys search in their accumulator dtype (``known`` is for 16-bit keys only).
    Returns (index (B, H, N) int64, distance (B, H, N) in that dtype); +inf where no other candidate
    is valid.
    """
    assert known is None or k.dtype in EXACT_KEY_DTYPES, "a kept search needs 16-bit keys"
    k = k.to(torch.float64 if k.dtype in EXACT_KEY_DTYPES else accumulator(k.dtype))
    squares = (k * k).sum(dim=-1).masked_fill(~valid, float("inf"))
    batch = k.shape[:-2]
    n, d = k.shape[-2:]
    flat, squares = k.reshape(-1, n, d), squares.reshape(-1, 1, n)
    # ||k_i - k_j||^2 less ||k_i||^2, the same for every j of row i: the order of row i's distances in one
    # matrix product, with invalid candidates' columns at +inf through their bias.
    if known is None:
        every = torch.arange(n, device=k.device).expand(flat.shape[0], n)
        index, distance = _nearest_among(flat, every, squares)
        return index.reshape(*batch, n), distance.reshape(*batch, n)
    capacity = known[0].shape[-1]
    # The products of the leaving keys with every key, once: the leaving rows read them as they are, the
    # cache rows read them transposed (k_i . k_j whichever is the row).
    products = torch.bmm(flat[:, capacity:], flat.transpose(1, 2))
    from_leaving = torch.add(squares, products, alpha=-2.0)
    from_leaving[:, :, capacity:].diagonal(dim1=-2, dim2=-1).fill_(float("inf"))
    leaving_best = from_leaving.min(dim=-1)
    to_leaving = torch.add(squares[..., capacity:].transpose(1, 2), products[..., :capacity], alpha=-2.0)
    cache_best = to_leaving.min(dim=1)
    known_index, known_distance = (x.reshape(-1, capacity) for x in known)
    # A known cache slot comes before every leaving one, so it wins ties.
    use_known = known_distance <= cache_best.values
    cache_index = torch.where(use_known, known_index, cache_best.indices + capacity)
    cache_distance = torch.where(use_known, known_distance, cache_best.values)
    index = torch.cat([cache_index, leaving_best.indices], dim=1)
    distance = torch.cat([cache_distance, leaving_best.values], dim=1)
    return index.reshape(*batch, n), distance.reshape(*batch, n)


def _nearest_among(keys: torch.Tensor, rows: torch.Tensor, squares: torch.Tensor) -> tuple:
    """The nearest of ``keys`` (R, N, D) to each of the rows ``rows`` (R, M) of them, itself left out:
    (index, distance) (R, M), distance as ``nearest_keys`` gives it; ``squares`` (R, 1, N): each key's
    squared norm, +inf for keys that may not be picked. min's indices, like argmin, take the first of
    equal values, and run several times faster on a CPU."""
    distance = torch.baddbmm(
        squares, _take_rows(keys[:, None], rows[:, None])[:, 0], keys.transpose(1, 2), alpha=-2.0
    )
    distance.scatter_(2, rows[..., None], float("inf"))
    best = distance.min(dim=-1)
    return best.indices, best.values


def nearest_after_eviction(
    cache_k: torch.Tensor,
    keep: torch.Tensor,
    valid: torch.Tensor,
    index: torch.Tensor,
    distance: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What ``nearest_keys`` takes as ``known`` for the cache an eviction made: (index, distance)
    (B, H, G) of each new cache slot's nearest valid other slot, and which slots are valid (G,).
    cache_k: (B, H, G, D), the kept candidates ``keep`` (B, H, G) (ascending); valid: (N,) the
    candidates' validity; index, distance: the candidates' own nearest (``nearest_keys`` of the
    eviction). A kept candidate whose nearest was kept too keeps it (the nearest of a set is the
    nearest of any subset holding it); the others are searched again."""
    batch, heads, capacity = keep.shape
    slots = torch.arange(capacity, device=keep.device)
    new_valid = slots >= capacity - min(int(valid.sum()), capacity)
    position = torch.full(index.shape, -1, dtype=torch.int64, device=keep.device)
    position.scatter_(2, keep, slots.expand_as(keep).contiguous())
    new_index = position.gather(2, index.gather(2, keep))
    new_distance = distance.gather(2, keep)
    stale = new_valid & ((new_index < 0) | new_distance.isinf())
    new_distance = new_distance.masked_fill(~new_valid, float("inf"))
    most = int(stale.sum(dim=-1).max())
    if most:
        # Each head's stale rows first (in slot order), padded to the most any head has.
        rows = stale.to(torch.int8).argsort(dim=-1, descending=True, stable=True)[..., :most]
        present = torch.arange(most, device=keep.device) < stale.sum(dim=-1, keepdim=True)
        k = cache_k.to(distance.dtype).flatten(0, 1)
        squares = (k * k).sum(dim=-1).masked_fill(~new_valid, float("inf"))[:, None]
        found = _nearest_among(k, rows.flatten(0, 1), squares)
        found_index, found_distance = (x.view(batch, heads, most) for x in found)
        new_index.scatter_(2, rows, torch.where(present, found_index, new_index.gather(2, rows)))
        new_distance.scatter_(2, rows, torch.where(present, found_distance, new_distance.gather(2, rows)))
    return new_index, new_distance, new_valid


def recall_error(v: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """|| v_i - v_index[i] ||: how badly candidate index[i] would stand in for pair i; ||v_i|| where no
    other candidate is valid. v: (B, H, N, D); index: (B, H, N) (``nearest_keys``'); valid: (N,) bool.
    Returns (B, H, N) in the accumulator dtype of v."""
    v = v.to(accumulator(v.dtype))
    error = torch.linalg.vector_norm(v - _take_rows(v, index), dim=-1)
    alone = valid.sum() - valid.long() == 0
    return torch.where(alone, torch.linalg.vector_norm(v, dim=-1), error)


def cache_recall_error(k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """|| v_i - v_j || for the valid candidate j != i whose key is nearest to k_i (Euclidean): how badly
    the other candidates would stand in for pair i. A pair the cache would hold twice (the same token
    in the same context, as repeated text gives) scores near zero.

    k, v: (B, Hq, N, D) un-rotated; valid: (N,) bool. Returns (B, Hq, N) fp32 (fp64 for fp64 inputs);
    ||v|| where no other candidate is valid.
    """
    return recall_error(v, nearest_keys(k, valid)[0], valid)


class CacheMemo:
    """What the reference keeps about a memory's cached keys between evictions, so that an eviction
    computes them only for the chunk leaving the window: their Hedgehog features, and each one's
    nearest other cached key (``nearest_keys``' ``known``). Both serve only the very cache tensor and
    feature map they were made from, unchanged in place since (version counters, where the tensors
    have them; inference tensors change in place only on the Triton path, which forgets them). Nothing
    is kept while autograd records through them.

    From a ``candidate_scores`` call to the ``evict`` given its ranking, it also holds the candidates
    (keys, values, features) and their nearest keys: that eviction takes them rather than building
    them again, and carries the nearest keys over to the cache it makes."""

    def __init__(self):
        self._kept: tuple | None = None
        self._scored: tuple | None = None

    @staticmethod
    def _stamp(*tensors: torch.Tensor) -> tuple:
        return tuple((None if t.is_inference() else t._version, t.data_ptr()) for t in tensors)

    def _valid(self, cache_k: torch.Tensor, fmap_k: torch.Tensor) -> tuple | None:
        kept = self._kept
        if kept is None or kept[0] is not cache_k or kept[1] is not fmap_k:
            return None
        return kept if kept[2] == self._stamp(cache_k, fmap_k) else None

    def get(self, cache_k: torch.Tensor, fmap_k: torch.Tensor) -> torch.Tensor | None:
        """The cached keys' features, or None."""
        kept = self._valid(cache_k, fmap_k)
        return None if kept is None else kept[3]

    def nearest(self, cache_k: torch.Tensor, fmap_k: torch.Tensor, valid: torch.Tensor) -> tuple | None:
        """``nearest_keys``' ``known`` for this cache whose valid slots are ``valid`` (G,), or None."""
        kept = self._valid(cache_k, fmap_k)
        if kept is None or kept[4] is None or not torch.equal(kept[4][2], valid):
            return None
        return kept[4][:2]

    def keep(self, cache_k, fmap_k, features, nearest: tuple | None = None) -> None:
        """Keep ``features`` and ``nearest`` ((index, distance, valid) or None) for this cache."""
        if torch.is_grad_enabled() and features.requires_grad:
            self._kept = None
        else:
            self._kept = (cache_k, fmap_k, self._stamp(cache_k, fmap_k), features, nearest)

    def hold_scored(self, memory: tuple, tokens_seen: int, candidates: tuple, nearest: tuple | None) -> None:
        """Hold the ``candidates`` (``_candidates``') and ``nearest`` scored from ``memory`` (win_k, win_v,
        cache_k, cache_v, fmap_k) after ``tokens_seen`` tokens."""
        if not (torch.is_grad_enabled() and candidates[2].requires_grad):
            self._scored = (memory, tokens_seen, self._stamp(*memory), candidates, nearest)

    def take_scored(self, memory: tuple, tokens_seen: int) -> tuple:
        """(candidates, nearest) that ``hold_scored`` held for these very tensors, unchanged, at this
        count (once), or (None, None)."""
        scored, self._scored = self._scored, None
        if scored is None or scored[1] != tokens_seen:
            return None, None
        if any(held is not given for held, given in zip(scored[0], memory, strict=True)):
            return None, None
        return scored[3:] if scored[2] == self._stamp(*memory) else (None, None)

    def export(self, cache_k: torch.Tensor) -> tuple | None:
        """What is kept for ``cache_k`` as it is now, for ``adopt`` into the memo of a copy of it (a
        checkpoint's); None where nothing is."""
        kept = self._kept
        if kept is None or kept[0] is not cache_k or kept[2] != self._stamp(cache_k, kept[1]):
            return None
        return (cache_k.shape, cache_k.dtype, cache_k.device), kept[1], kept[2][1], kept[3], kept[4]

    def adopt(self, cache_k: torch.Tensor, exported: tuple) -> None:
        """Keep for ``cache_k``, an exact copy of the cache ``exported`` was taken from, what ``export``
        gave (the feature map's stamp stays the one taken then); nothing where the copy has another
        shape, dtype or device."""
        layout, fmap_k, fmap_stamp, features, nearest = exported
        self._scored = None
        if layout != (cache_k.shape, cache_k.dtype, cache_k.device):
            self._kept = None
            return
        self._kept = (cache_k, fmap_k, (self._stamp(cache_k)[0], fmap_stamp), features, nearest)

    def forget(self) -> None:
        self._kept = self._scored = None


def _candidates(win_k, win_v, cache_k, cache_v, fmap_k, tokens_seen, memo):
    """(cand_k, cand_v, phi_k, valid) of the eviction that closes the current chunk: the cache slots, then
    the leaving chunk, each expanded to the query heads (``fmap_k``'s); None when nothing leaves the
    window."""
    chunk = win_k.shape[2] // 2
    capacity = cache_k.shape[2]
    assert tokens_seen % chunk == 0 and tokens_seen > 0, "eviction runs only when a chunk is full"
    cached, previous, _ = frame(tokens_seen - 1, chunk, capacity)
    if not previous:
        return None
    n_heads = fmap_k.shape[0]
    leaving_k = expand_heads(win_k[:, :, :chunk], n_heads)
    leaving_v = expand_heads(win_v[:, :, :chunk], n_heads)
    cand_k = torch.cat([expand_heads(cache_k, n_heads), leaving_k], dim=2)
    cand_v = torch.cat([expand_heads(cache_v, n_heads), leaving_v], dim=2)
    valid = torch.arange(capacity + chunk, device=cand_k.device) >= capacity - cached
    cached_features = memo.get(cache_k, fmap_k) if memo is not None else None
    if cached_features is None:
        phi_k = hedgehog(cand_k, fmap_k)
    else:
        phi_k = torch.cat([cached_features, hedgehog(leaving_k, fmap_k)], dim=2)
    return cand_k, cand_v, phi_k, valid


def _policy_score(cand_k, cand_v, phi_k, valid, h, s, policy, generator, group=1, known=None):
    """The candidates' scores under ``policy``, and under a novelty policy each one's nearest key as
    ``nearest_keys`` gives it (else None). ``group``: how many consecutive query heads hold the very
    same candidates (a cache kept per KV head): the cache-recall error, a function of the candidates
    alone, is then searched once per group rather than once per query head. ``known``: see
    ``nearest_keys``."""
    if policy in RECALL_POLICIES:
        score = self_recall_error(phi_k, cand_v, h, s)
        if policy.startswith("relative-"):
            size = torch.linalg.vector_norm(cand_v.to(score.dtype), dim=-1)
            score = score / size.clamp_min(SRE_EPS)
        nearest = None
        if policy.endswith("novelty"):
            nearest = nearest_keys(cand_k[:, ::group], valid, known)
            recall = recall_error(cand_v[:, ::group], nearest[0], valid)
            score = torch.minimum(score, expand_heads(recall, score.shape[1]))
        return score, nearest
    if policy == "random":
        return torch.rand(cand_v.shape[:3], generator=generator, device="cpu").to(cand_v.device), None
    if policy == "recent":
        score = torch.arange(valid.shape[0], device=cand_k.device, dtype=torch.float32)
        return score.expand(cand_v.shape[:3]), None
    raise ValueError(f"unknown eviction policy {policy!r}")


def candidate_scores(
    win_k: torch.Tensor,
    win_v: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    h: torch.Tensor,
    s: torch.Tensor,
    fmap_k: torch.Tensor,
    tokens_seen: int,
    policy: str = "sre",
    generator: torch.Generator | None = None,
    memo: CacheMemo | None = None,
) -> torch.Tensor | None:
    """The scores ``evict`` would rank its candidates by (same arguments): (B, Hq, G + C), -inf for
    candidates that are not there (empty cache slots), higher kept first; None where ``evict`` ranks
    nothing (nothing leaves the window, or G = 0). For a selection made from several memories' scores
    at once (``evict``'s ``score``)."""
    found = _candidates(win_k, win_v, cache_k, cache_v, fmap_k, tokens_seen, memo)
    if found is None or cache_k.shape[2] == 0:
        return None
    known = None if memo is None else memo.nearest(cache_k, fmap_k, found[3][: cache_k.shape[2]])
    group = h.shape[1] // cache_k.shape[1]
    score, nearest = _policy_score(*found, h, s, policy, generator, group, known)
    if memo is not None:
        memo.hold_scored((win_k, win_v, cache_k, cache_v, fmap_k), tokens_seen, found, nearest)
    return score.masked_fill(~found[3], float("-inf"))


def evict(
    win_k: torch.Tensor,
    win_v: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    h: torch.Tensor,
    s: torch.Tensor,
    fmap_k: torch.Tensor,
    tokens_seen: int,
    policy: str = "sre",
    generator: torch.Generator | None = None,
    memo: CacheMemo | None = None,
    pinned: torch.Tensor | None = None,
    score: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Close the current chunk (it must be full): the previous chunk leaves the window.

    Its pairs and the cached pairs are scored against the current H and s; the top G stay in the
    cache (kept in time order), the rest are folded into H and s; the current chunk becomes the
    previous one. ``tokens_seen`` counts the full current chunk. ``policy`` is one of
    ``RECALL_POLICIES`` ("sre" is the method) or, for ablations, "random" or "recent". Returns new
    (win_k, win_v, cache_k, cache_v, h, s) and ``keep`` (B, Hq, G): for each new cache slot, its index
    among the candidates (old cache slots 0..G-1, then the leaving chunk's tokens G..G+C-1), or None
    when nothing left the window or G = 0.
    ``memo``: the caller's ``CacheMemo`` (it reuses what it kept of the cached keys and keeps the new
    cache's), or None to compute every candidate's features and nearest keys afresh.
    ``pinned``: (B, Hq, G + C) bool, candidates kept before any other whatever their scores (the
    earliest where more than G are pinned), or None.
    ``score``: (B, Hq, G + C), the candidates' ranking given instead of computed from ``policy`` (see
    ``candidate_scores``), or None. A cache kept per KV head (cache_k (B, Hkv, G, D)) needs a ranking
    that is the same for every query head of a group (a joint policy's).
    """
    chunk = win_k.shape[2] // 2
    capacity = cache_k.shape[2]
    cached, _, _ = frame(tokens_seen - 1, chunk, capacity)
    keep = None
    found = nearest = None
    if memo is not None:
        found, nearest = memo.take_scored((win_k, win_v, cache_k, cache_v, fmap_k), tokens_seen)
    if found is None:
        found = _candidates(win_k, win_v, cache_k, cache_v, fmap_k, tokens_seen, memo)
    if found is not None:
        cand_k, cand_v, phi_k, valid = found
        if capacity > 0:
            group = h.shape[1] // cache_k.shape[1]
            if score is None:
                known = None if memo is None else memo.nearest(cache_k, fmap_k, valid[:capacity])
                score, nearest = _policy_score(
                    cand_k, cand_v, phi_k, valid, h, s, policy, generator, group, known
                )
            if pinned is not None:
                score = score.masked_fill(pinned, float("inf"))
            score = score.masked_fill(~valid, float("-inf"))
            # A stable sort keeps the earlier of two equal scores (repeated tokens give exact ties).
            order = score.sort(dim=-1, descending=True, stable=True).indices
            keep = order[..., :capacity].sort(dim=-1).values
            # A cache per KV head: every query head of a group ranked alike; its first head's choice.
            kept = keep[:, ::group]
            if group == 1:
                cache_k, cache_v = _take_rows(cand_k, keep), _take_rows(cand_v, keep)
            else:
                cache_k = _take_rows(torch.cat([cache_k, win_k[:, :, :chunk]], dim=2), kept)
                cache_v = _take_rows(torch.cat([cache_v, win_v[:, :, :chunk]], dim=2), kept)
            if memo is not None:
                if nearest is not None and cache_k.dtype in EXACT_KEY_DTYPES:
                    nearest = nearest_after_eviction(cache_k, kept, valid, *nearest)
                else:
                    nearest = None
                memo.keep(cache_k, fmap_k, _take_rows(phi_k, keep), nearest)
            # Invalid slots score -inf and sort last, so the valid candidates not kept are these.
            folded = order[..., capacity : cached + chunk].sort(dim=-1).values
            phi_k, cand_v = _take_rows(phi_k, folded), _take_rows(cand_v, folded)
        h = h + phi_k.transpose(-1, -2) @ cand_v.to(h.dtype)
        s = s + phi_k.sum(dim=2)
    win_k = torch.cat([win_k[:, :, chunk:], win_k[:, :, chunk:]], dim=2)
    win_v = torch.cat([win_v[:, :, chunk:], win_v[:, :, chunk:]], dim=2)
    return win_k, win_v, cache_k, cache_v, h, s, keep
