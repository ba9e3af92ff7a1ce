"""Representation rearrangement: the permutation itself, and its effect inside a stack."""
import pytest
import torch

from grnn_fairseq.rearrangement import (
    check_mode,
    inverse_rearrange,
    rearrange,
    rearrange_grouped,
    rearranged_flat,
    rearrangement_permutation,
)
from grnn_fairseq.recurrent import RecurrentStack


def shuffle_by_definition(x, k):
    """Gao et al.: channel j of group g goes to position j*K + g (written as a plain loop)."""
    d = x.shape[-1]
    m = d // k
    y = torch.empty_like(x)
    for g in range(k):
        for j in range(m):
            y[..., j * k + g] = x[..., g * m + j]
    return y


@pytest.mark.parametrize("width,k", [(12, 1), (12, 2), (12, 3), (12, 4), (32, 4), (64, 16)])
def test_permutation_is_bijection_with_inverse(width, k):
    p = rearrangement_permutation(width, k)
    assert sorted(p.tolist()) == list(range(width))
    x = torch.randn(3, width)
    assert torch.equal(rearrange(x, k), x[..., p])
    assert torch.equal(rearrange(x, k), shuffle_by_definition(x, k))
    assert torch.equal(inverse_rearrange(rearrange(x, k), k), x)
    assert torch.equal(rearrange(inverse_rearrange(x, k), k), x)
    if k == 1:
        assert torch.equal(p, torch.arange(width))
    else:
        assert not torch.equal(p, torch.arange(width))


@pytest.mark.parametrize("k,m", [(1, 5), (2, 3), (4, 8)])
def test_grouped_state_shuffle_matches_flat(k, m):
    b = 3
    flat = torch.randn(b, k * m)
    grouped = flat.view(b, k, m).transpose(0, 1)
    out = rearrange_grouped(grouped)
    assert torch.equal(out.transpose(0, 1).reshape(b, k * m), rearrange(flat, k))
    assert torch.equal(rearranged_flat(grouped), shuffle_by_definition(flat, k))


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="rearrangement='shuffle'.*none"):
        check_mode("shuffle")
    with pytest.raises(ValueError, match="rearrangement"):
        RecurrentStack(8, 8, groups=2, rearrangement="sideways")


def _group_changes(out_a, out_b, k):
    """Which groups of a [B, H] output differ."""
    diff = (out_a - out_b).abs().view(out_a.shape[0], k, -1).amax(dim=(0, 2))
    return [bool(d > 1e-9) for d in diff]


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_time_rearrangement_spreads_a_group_to_all_groups_next_step(cell):
    torch.manual_seed(0)
    k, t = 4, 2
    x = torch.randn(5, 2, 16, dtype=torch.double)
    x2 = x.clone()
    x2[t, :, :4] += 1.0  # perturb group 0's input at step t
    for mode, expected in [("time", [True] * k), ("none", [True] + [False] * (k - 1))]:
        torch.manual_seed(1)
        stack = RecurrentStack(16, 32, cell=cell, groups=k, rearrangement=mode).double()
        out_a, _ = stack(x)
        out_b, _ = stack(x2)
        assert _group_changes(out_a[t], out_b[t], k) == [True] + [False] * (k - 1)
        assert _group_changes(out_a[t + 1], out_b[t + 1], k) == expected, mode
        assert torch.equal(out_a[:t], out_b[:t])


def test_layer_rearrangement_spreads_a_group_across_layers():
    torch.manual_seed(0)
    k = 4
    x = torch.randn(3, 2, 16, dtype=torch.double)
    x2 = x.clone()
    x2[0, :, :4] += 1.0
    for mode, expected in [("layer", [True] * k), ("none", [True] + [False] * (k - 1))]:
        torch.manual_seed(1)
        stack = RecurrentStack(16, 32, num_layers=2, groups=k, rearrangement=mode).double()
        out_a, _ = stack(x)
        out_b, _ = stack(x2)
        # same step, second layer: only the between-layer shuffle can mix groups
        assert _group_changes(out_a[0], out_b[0], k) == expected, mode
