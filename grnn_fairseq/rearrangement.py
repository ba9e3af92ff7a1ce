"""Representation rearrangement (Gao et al., NAACL 2018, Section 3.2).

A parameter-free channel shuffle: a width-``d`` vector made of ``K`` groups is viewed as
``(K, d/K)``, transposed to ``(d/K, K)`` and flattened, so that channel ``j`` of group ``k``
moves to position ``j*K + k``.  After it, every group of the next consumer sees
``d/K**2`` channels of every group of the producer (when ``d/K >= K``).
"""
import torch

from .errors import ConfigError

REARRANGEMENT_MODES = ("none", "layer", "time", "both")


def check_mode(mode):
    if mode not in REARRANGEMENT_MODES:
        raise ConfigError(
            f"rearrangement={mode!r} is not a rearrangement mode; use one of {REARRANGEMENT_MODES}"
        )
    return mode


def uses_layer(mode):
    """Shuffle the input of every stacked layer after the first."""
    return check_mode(mode) in ("layer", "both")


def uses_time(mode):
    """Shuffle h_{t-1} before every recurrent product."""
    return check_mode(mode) in ("time", "both")


def rearrange(x, groups):
    """Channel shuffle of the last dimension. x: [..., d] -> [..., d]."""
    if groups == 1:
        return x
    d = x.shape[-1]
    return x.unflatten(-1, (groups, d // groups)).transpose(-1, -2).flatten(-2)


def inverse_rearrange(x, groups):
    """Inverse of :func:`rearrange`. x: [..., d] -> [..., d]."""
    if groups == 1:
        return x
    d = x.shape[-1]
    return x.unflatten(-1, (d // groups, groups)).transpose(-1, -2).flatten(-2)


def rearrangement_permutation(width, groups):
    """Index vector ``p`` with ``rearrange(x, groups) == x[..., p]``."""
    return rearrange(torch.arange(width), groups)


def rearranged_flat(h):
    """The shuffle of a state kept per group, flat: h [K, B, m] -> [B, K*m], equal to
    ``rearrange`` of the flat vector (unit k*m + j at j*K + k), made with one copy."""
    # flat index k*m + j  ->  j*K + k ; in (B, m, K) order that is a plain reshape.
    return h.permute(1, 2, 0).reshape(h.shape[1], -1)


def rearrange_grouped(h):
    """The same shuffle on a state kept per group. h: [K, B, m] -> [K, B, m].

    Equal to ``rearrange`` applied to the flat [B, K*m] vector and split back into groups.
    """
    k, b, m = h.shape
    if k == 1:
        return h
    return rearranged_flat(h).view(b, k, m).transpose(0, 1)
