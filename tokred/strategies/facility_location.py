"""Greedy facility location, vectorised over batch × groups.

For a group with non-negative similarities s(i, j), the facility-location objective of a destination set D is
f(D) = Σᵢ max_{j∈D} s(i, j). It is monotone submodular, so picking d destinations greedily — each time the token
with the largest gain Σᵢ max(0, s(i, j) − mᵢ), mᵢ being the best coverage of source i so far — reaches at least
(1 − 1/e) of the optimum.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def nonnegative_similarity(similarity: Tensor, valid: Tensor) -> Tensor:
    """(S + 1) / 2 in [0, 1], with the rows of padded (invalid) sources zeroed so they never count."""
    return (similarity + 1.0).mul_(0.5).mul_(valid.unsqueeze(-1).to(similarity.dtype))


def greedy_facility_location(s: Tensor, valid: Tensor, count: int, symmetric: bool = False) -> tuple[Tensor, Tensor]:
    """Greedy maximisation of Σᵢ maxⱼ s(i, j) over destination sets of size ``count``.

    Args:
        s: (..., n, n) non-negative similarities, s[..., i, j] between source i and candidate j; rows of
            padded sources must be zero.
        valid: (..., n) or broadcastable: which slots may be picked.
        count: destinations to pick (the loop runs ``count`` times; each pass is one batched tensor op over
            every batch element and group).
        symmetric: ``s`` is symmetric (a similarity of groups without padding), so its rows are its columns and
            need no transposed copy.

    Returns:
        (indices, gains): (..., count) picked slots in pick order and the gain of each pick. Once a group has
        no valid slot left, its remaining picks repeat slot 0 with gain -inf.
    """
    n = s.shape[-1]
    batch_shape = s.shape[:-2]
    rows = s.reshape(-1, n, n)  # rows[b, j] = column j of s, a cheap gather
    if not symmetric:
        rows = rows.transpose(-1, -2).contiguous()
    flat = torch.arange(rows.shape[0], device=s.device)
    cover = s.new_zeros((*batch_shape, n))
    blocked = (~valid.to(torch.bool)).expand(*batch_shape, n).clone()
    indices = torch.empty((*batch_shape, count), dtype=torch.long, device=s.device)
    gains = torch.empty((*batch_shape, count), dtype=s.dtype, device=s.device)
    scratch = torch.empty_like(s)
    for k in range(count):
        # gain_j = Σᵢ max(0, s_ij − mᵢ) = Σᵢ max(s_ij, mᵢ) − Σᵢ mᵢ
        score = torch.maximum(s, cover.unsqueeze(-1), out=scratch).sum(-2).sub_(cover.sum(-1, keepdim=True))
        score.masked_fill_(blocked, float("-inf"))
        best_gain, best = score.max(-1)
        indices[..., k] = best
        gains[..., k] = best_gain
        blocked.scatter_(-1, best.unsqueeze(-1), True)
        torch.maximum(cover, rows[flat, best.flatten()].view_as(cover), out=cover)
    return indices, gains


def stochastic_greedy_facility_location(
    s: Tensor, valid: Tensor, count: int, epsilon: float = 0.1, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Stochastic greedy ("lazier than lazy greedy", Mirzasoleiman et al., AAAI 2015): each of the ``count``
    passes scores only r = ⌈(n / count)·ln(1/ε)⌉ candidates drawn at random from the unpicked ones.

    The expected objective is at least (1 − 1/e − ε) of the optimum, as for exact greedy with ε more; a pass costs
    O(n·r) instead of O(n²), so the whole selection is O(n²·ln(1/ε)) rather than O(count·n²). Same arguments and
    returns as :func:`greedy_facility_location`.
    """
    n = s.shape[-1]
    batch_shape = s.shape[:-2]
    draws = min(n, max(1, math.ceil(n / max(count, 1) * math.log(1.0 / epsilon))))
    cover = s.new_zeros((*batch_shape, n))
    blocked = (~valid.to(torch.bool)).expand(*batch_shape, n).clone()
    indices = torch.empty((*batch_shape, count), dtype=torch.long, device=s.device)
    gains = torch.empty((*batch_shape, count), dtype=s.dtype, device=s.device)
    for k in range(count):
        noise = torch.rand((*batch_shape, n), generator=generator, device=s.device)
        candidates = noise.masked_fill_(blocked, -1.0).topk(draws, dim=-1).indices  # (..., r) random unpicked
        columns = s.gather(-1, candidates.unsqueeze(-2).expand(*batch_shape, n, draws))  # (..., n, r)
        score = torch.maximum(columns, cover.unsqueeze(-1)).sum(-2).sub_(cover.sum(-1, keepdim=True))
        score.masked_fill_(blocked.gather(-1, candidates), float("-inf"))
        best_gain, best = score.max(-1)
        picked = candidates.gather(-1, best.unsqueeze(-1))
        indices[..., k] = picked.squeeze(-1)
        gains[..., k] = best_gain
        blocked.scatter_(-1, picked, True)
        torch.maximum(
            cover, columns.gather(-1, best.view(*batch_shape, 1, 1).expand(*batch_shape, n, 1)).squeeze(-1), out=cover
        )
    return indices, gains


def facility_location_objective(s: Tensor, indices: Tensor, counts: Tensor | None = None) -> Tensor:
    """f(D) = Σᵢ max_{j∈D} s(i, j) for destinations ``indices`` (..., d); ``counts`` (...,) limits d per group."""
    n = s.shape[-1]
    picked = s.gather(-1, indices.unsqueeze(-2).expand(*indices.shape[:-1], n, indices.shape[-1]))
    if counts is not None:
        used = torch.arange(indices.shape[-1], device=s.device) < counts.unsqueeze(-1)
        picked = picked.masked_fill(~used.unsqueeze(-2), 0.0)
    return picked.amax(-1).sum(-1)
