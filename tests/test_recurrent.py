"""Recurrent layers against independent references: torch.nn with copied weights, K
separate torch cells, and restricted gate matrices assembled by hand."""
import pytest
import torch

from grnn_fairseq import engine
from grnn_fairseq.recurrent import RecurrentStack
from grnn_fairseq.rearrangement import rearrangement_permutation
from grnn_fairseq.restricted import RestrictedWeights

TORCH = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}
CELL = {"lstm": torch.nn.LSTMCell, "gru": torch.nn.GRUCell, "rnn": torch.nn.RNNCell}


def copy_into_torch(stack, ref, group=0):
    """Copy group `group` of every layer/direction of a K=1 or grouped stack into torch.nn."""
    with torch.no_grad():
        for l, layer in enumerate(stack.layers):
            for d, w in enumerate(layer.directions):
                sfx = f"_l{l}" + ("_reverse" if d else "")
                w_ih, w_hh, b_ih, b_hh = w()
                getattr(ref, "weight_ih" + sfx).copy_(w_ih[group])
                getattr(ref, "weight_hh" + sfx).copy_(w_hh[group])
                getattr(ref, "bias_ih" + sfx).copy_(b_ih[group])
                getattr(ref, "bias_hh" + sfx).copy_(b_hh[group])


def split_state(s):
    return s if isinstance(s, tuple) else (s,)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_k1_equals_torch_nn(cell, bidirectional, dtype, tol):
    torch.manual_seed(0)
    stack = RecurrentStack(6, 8, num_layers=2, cell=cell, bidirectional=bidirectional).to(dtype)
    ref = TORCH[cell](6, 8, num_layers=2, bidirectional=bidirectional).to(dtype)
    copy_into_torch(stack, ref)
    d = 2 if bidirectional else 1
    x = torch.randn(7, 3, 6, dtype=dtype, requires_grad=True)
    h0 = torch.randn(2 * d, 3, 8, dtype=dtype)
    state = (h0, torch.randn_like(h0)) if cell == "lstm" else h0
    out, final = stack(x, state)
    out_ref, final_ref = ref(x, state)
    torch.testing.assert_close(out, out_ref, atol=tol, rtol=tol)
    for a, b in zip(split_state(final), split_state(final_ref)):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    # gradients: input and every weight
    g = torch.randn_like(out)
    gx, = torch.autograd.grad((out * g).sum() + sum(s.sum() for s in split_state(final)), x, retain_graph=True)
    gx_ref, = torch.autograd.grad((out_ref * g).sum() + sum(s.sum() for s in split_state(final_ref)), x, retain_graph=True)
    torch.testing.assert_close(gx, gx_ref, atol=tol, rtol=tol)
    ((out * g).sum()).backward()
    ((out_ref * g).sum()).backward()
    for l, layer in enumerate(stack.layers):
        for di, w in enumerate(layer.directions):
            sfx = f"_l{l}" + ("_reverse" if di else "")
            torch.testing.assert_close(w.weight_hh.grad[0], getattr(ref, "weight_hh" + sfx).grad, atol=tol, rtol=tol)
            torch.testing.assert_close(w.weight_ih.grad[0], getattr(ref, "weight_ih" + sfx).grad, atol=tol, rtol=tol)
            torch.testing.assert_close(w.bias_ih.grad[0], getattr(ref, "bias_ih" + sfx).grad, atol=tol, rtol=tol)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_groups_without_rearrangement_are_independent_torch_cells(cell, bidirectional):
    torch.manual_seed(0)
    k, i, h = 4, 12, 16
    stack = RecurrentStack(i, h, cell=cell, groups=k, rearrangement="none",
                           bidirectional=bidirectional).double()
    x = torch.randn(5, 2, i, dtype=torch.double)
    out, final = stack(x)
    d = 2 if bidirectional else 1
    outs = []
    for g in range(k):
        ref = TORCH[cell](i // k, h // k, bidirectional=bidirectional).double()
        copy_into_torch(stack, ref, group=g)
        o, _ = ref(x[..., g * (i // k):(g + 1) * (i // k)])
        outs.append(o.view(5, 2, d, h // k))
    expected = torch.stack(outs, dim=3).reshape(5, 2, d * h)  # [T, B, D, K, m] -> D-major, then groups
    torch.testing.assert_close(out, expected)


def reference_time_shuffle(stack, x, cell):
    """One unidirectional layer, time rearrangement, written with torch's own cells: each
    group's cell reads the shuffled h_{t-1} (index vector from rearrangement_permutation)
    and keeps its own c_{t-1} (LSTM) -- the documented semantics."""
    w_ih, w_hh, b_ih, b_hh = stack.layers[0].directions[0]()
    k, gm, ik = w_ih.shape
    m = w_hh.shape[2]
    cells = []
    for g in range(k):
        c = CELL[cell](ik, m).double()
        with torch.no_grad():
            c.weight_ih.copy_(w_ih[g]); c.weight_hh.copy_(w_hh[g])
            c.bias_ih.copy_(b_ih[g]); c.bias_hh.copy_(b_hh[g])
        cells.append(c)
    perm = rearrangement_permutation(k * m, k)
    b = x.shape[1]
    h = torch.zeros(b, k * m, dtype=x.dtype)
    c_state = torch.zeros(b, k * m, dtype=x.dtype)
    outs = []
    for x_t in x:
        hp = h[:, perm]
        new_h, new_c = [], []
        for g in range(k):
            sl = slice(g * m, (g + 1) * m)
            xg = x_t[:, g * ik:(g + 1) * ik]
            if cell == "lstm":
                hg, cg = cells[g](xg, (hp[:, sl], c_state[:, sl]))
                new_c.append(cg)
            else:
                hg = cells[g](xg, hp[:, sl])
            new_h.append(hg)
        h = torch.cat(new_h, -1)
        if cell == "lstm":
            c_state = torch.cat(new_c, -1)
        outs.append(h)
    return torch.stack(outs)


@pytest.mark.parametrize("cell", ["lstm", "rnn"])
def test_time_rearrangement_matches_per_group_torch_cells(cell):
    torch.manual_seed(0)
    stack = RecurrentStack(12, 32, cell=cell, groups=4, rearrangement="time").double()
    x = torch.randn(6, 3, 12, dtype=torch.double)
    out, _ = stack(x)
    torch.testing.assert_close(out, reference_time_shuffle(stack, x, cell))


def test_gru_time_rearrangement_keeps_own_state_in_interpolation():
    """GRU: the recurrent product reads the shuffled h_{t-1}; z * h_{t-1} uses the unit's own."""
    torch.manual_seed(0)
    k, m = 2, 4
    stack = RecurrentStack(4, k * m, cell="gru", groups=k, rearrangement="time").double()
    w_ih, w_hh, b_ih, b_hh = stack.layers[0].directions[0]()
    x = torch.randn(3, 1, 4, dtype=torch.double)
    perm = rearrangement_permutation(k * m, k)
    h = torch.zeros(1, k * m, dtype=torch.double)
    for x_t in x:
        hp = h[:, perm]
        parts = []
        for g in range(k):
            sl = slice(g * m, (g + 1) * m)
            gx = x_t[:, g * 2:(g + 1) * 2] @ w_ih[g].t() + b_ih[g]
            gh = hp[:, sl] @ w_hh[g].t() + b_hh[g]
            r = torch.sigmoid(gx[:, :m] + gh[:, :m])
            z = torch.sigmoid(gx[:, m:2 * m] + gh[:, m:2 * m])
            n = torch.tanh(gx[:, 2 * m:] + r * gh[:, 2 * m:])
            parts.append((1 - z) * n + z * h[:, sl])
        h = torch.cat(parts, -1)
    out, _ = stack(x)
    torch.testing.assert_close(out[-1], h)


def restricted_by_hand(w, gates, input_size, hidden_size, group=0):
    """Effective gate matrices of a RestrictedWeights, assembled row by row from the pool."""
    s, p = w.shared, w.private
    m = hidden_size
    wi = torch.zeros(gates * m, input_size, dtype=torch.double)
    wh = torch.zeros(gates * m, m, dtype=torch.double)
    bi = torch.zeros(gates * m, dtype=torch.double)
    bh = torch.zeros(gates * m, dtype=torch.double)
    for gate in range(gates):
        for j in range(m):
            row = gate * m + j
            if j < s:
                wi[row] = w.shared_weight[group, j, :input_size]
                wh[row] = w.shared_weight[group, j, :m]
                bi[row] = bh[row] = w.shared_bias[group, j]
            else:
                q = gate * p + (j - s)
                wi[row] = w.private_weight_ih[group, q]
                wh[row] = w.private_weight_hh[group, q]
                bi[row] = w.private_bias_ih[group, q]
                bh[row] = w.private_bias_hh[group, q]
    return wi, wh, bi, bh


@pytest.mark.parametrize("cell,gates", [("lstm", 4), ("gru", 3), ("rnn", 1)])
@pytest.mark.parametrize("rate", [0.25, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("input_size", [6, 10])
def test_restricted_matches_hand_assembled_torch_cell(cell, gates, rate, input_size):
    torch.manual_seed(0)
    stack = RecurrentStack(input_size, 8, cell=cell, sharing_rate=rate).double()
    w = stack.layers[0].directions[0]
    assert isinstance(w, RestrictedWeights)
    ref = TORCH[cell](input_size, 8).double()
    with torch.no_grad():
        for name, t in zip(("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"),
                           restricted_by_hand(w, gates, input_size, 8)):
            getattr(ref, name).copy_(t)
    x = torch.randn(5, 3, input_size, dtype=torch.double)
    out, _ = stack(x)
    out_ref, _ = ref(x)
    torch.testing.assert_close(out, out_ref)
    if rate == 1.0:  # every gate and both inputs read the same matrix
        w_ih, w_hh, _, _ = w()
        blocks = w_hh[0].chunk(gates, 0)
        assert all(torch.equal(b, blocks[0]) for b in blocks)
        assert torch.equal(w_ih[0][:8, :min(input_size, 8)], w_hh[0][:8, :min(input_size, 8)])


def test_restricted_gradients_reach_the_pool():
    torch.manual_seed(0)
    stack = RecurrentStack(6, 8, cell="lstm", sharing_rate=0.5).double()
    out, _ = stack(torch.randn(4, 2, 6, dtype=torch.double))
    out.sum().backward()
    for name, p in stack.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_sharing_rate_zero_is_exactly_the_standard_cell():
    torch.manual_seed(0)
    stack = RecurrentStack(6, 8, num_layers=2, cell="gru", sharing_rate=0.0).double()
    ref = torch.nn.GRU(6, 8, num_layers=2).double()
    copy_into_torch(stack, ref)
    x = torch.randn(5, 2, 6, dtype=torch.double)
    torch.testing.assert_close(stack(x)[0], ref(x)[0])
    assert sum(p.numel() for p in stack.parameters()) == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("rate", [0.5, 1.0])
def test_restricted_with_groups_shares_inside_every_group(rate):
    torch.manual_seed(0)
    k, i, h = 2, 8, 12
    stack = RecurrentStack(i, h, cell="lstm", groups=k, sharing_rate=rate, rearrangement="none").double()
    w = stack.layers[0].directions[0]
    x = torch.randn(4, 2, i, dtype=torch.double)
    out, _ = stack(x)
    outs = []
    for g in range(k):
        ref = torch.nn.LSTM(i // k, h // k).double()
        with torch.no_grad():
            for name, t in zip(("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"),
                               restricted_by_hand(w, 4, i // k, h // k, group=g)):
                getattr(ref, name).copy_(t)
        outs.append(ref(x[..., g * (i // k):(g + 1) * (i // k)])[0])
    torch.testing.assert_close(out, torch.cat(outs, -1))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_never_changes_real_tokens(cell, side):
    torch.manual_seed(0)
    stack = RecurrentStack(6, 8, num_layers=2, cell=cell, groups=2, bidirectional=True).double()
    lengths = [5, 3, 1]
    t_max = max(lengths)
    seqs = [torch.randn(n, 6, dtype=torch.double) for n in lengths]
    x = torch.zeros(t_max, len(seqs), 6, dtype=torch.double)
    pad = torch.ones(t_max, len(seqs), dtype=torch.bool)
    for b, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(t_max - len(s), t_max)
        x[sl, b] = s
        x[~pad[:, b].clone().fill_(True), b]  # no-op, keeps shapes obvious
        pad[sl, b] = False
    x = x + pad.unsqueeze(-1) * 7.0  # garbage in the padding must not leak
    out, final = stack(x, padding_mask=pad)
    for b, s in enumerate(seqs):
        alone, final_alone = stack(s.unsqueeze(1))
        sl = slice(0, len(s)) if side == "right" else slice(t_max - len(s), t_max)
        torch.testing.assert_close(out[sl, b], alone[:, 0])
        assert torch.all(out[pad[:, b], b] == 0)
        for a, c in zip(split_state(final), split_state(final_alone)):
            torch.testing.assert_close(a[:, b], c[:, 0])


def test_stack_step_matches_forward():
    torch.manual_seed(0)
    stack = RecurrentStack(6, 8, num_layers=3, cell="lstm", groups=2, sharing_rate=0.5).double()
    x = torch.randn(5, 2, 6, dtype=torch.double)
    out, _ = stack(x)
    states = [s[0] for s in stack.zero_state(2, x)]
    for t in range(5):
        h, states = stack.step(x[t], states)
        torch.testing.assert_close(h, out[t])


def test_per_forward_work_is_outside_the_time_loop(monkeypatch):
    """Restricted weights assembled and inputs projected once per layer and direction
    (these small products by PyTorch's, ``engine._project_blas``, on every CPU backend)."""
    calls = {"weights": 0, "project": 0}
    orig_w, orig_p = RestrictedWeights.forward, engine._project_blas

    def counting_weights(self):
        calls["weights"] += 1
        return orig_w(self)

    def counting_project(*a):
        calls["project"] += 1
        return orig_p(*a)

    monkeypatch.setattr(RestrictedWeights, "forward", counting_weights)
    monkeypatch.setattr(engine, "_project_blas", counting_project)
    stack = RecurrentStack(6, 8, num_layers=2, sharing_rate=0.5, bidirectional=True)
    stack(torch.randn(20, 2, 6))
    assert calls == {"weights": 4, "project": 4}


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(groups=3), r"groups=3 does not divide input_size=8; .*use groups in \[1, 2, 4, 8\]"),
    (dict(groups=0), r"groups=0 must be a positive integer"),
    (dict(groups=2.5), r"groups=2.5 must be a positive integer"),
    (dict(sharing_rate=1.5), r"sharing_rate=1.5 is outside \[0, 1\]"),
    (dict(sharing_rate=-0.1), r"sharing_rate=-0.1 is outside \[0, 1\]"),
    (dict(sharing_rate=[0.5]), r"sharing_rate=\[0.5\] has 1 values for num_layers=2"),
    (dict(cell="lstmx"), r"cell='lstmx' is not a known cell type; use one of \('lstm', 'gru', 'rnn'\)"),
    (dict(rearrangement="all"), r"rearrangement='all' is not a rearrangement mode"),
    (dict(dropout=1.0), r"dropout=1.0 must be in \[0, 1\)"),
    (dict(init_range=0.0), r"init_range=0.0 must be a positive number R"),
    (dict(init_range=-0.1), r"init_range=-0.1 must be a positive number R"),
    (dict(init_range=float("nan")), r"init_range=nan must be a positive number R"),
    (dict(init_range=float("inf")), r"init_range=inf must be a positive number R"),
    (dict(init_range=True), r"init_range=True must be a positive number R"),
    # the restricted pool checks it too
    (dict(init_range=0, sharing_rate=0.5), r"init_range=0 must be a positive number R"),
])
def test_bad_configuration_is_rejected_at_build_time(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        RecurrentStack(8, 8, num_layers=2, **kwargs)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_default_init_of_k1_is_torch_nn_bit_for_bit(cell, bidirectional):
    """K=1's default initialisation is torch.nn's (U(-1/sqrt(H), 1/sqrt(H)), drawn in the
    same order): seeded alike, the two hold the same numbers."""
    torch.manual_seed(3)
    ref = TORCH[cell](6, 8, num_layers=2, bidirectional=bidirectional)
    torch.manual_seed(3)
    stack = RecurrentStack(6, 8, num_layers=2, cell=cell, bidirectional=bidirectional)
    copied = TORCH[cell](6, 8, num_layers=2, bidirectional=bidirectional)
    copy_into_torch(stack, copied)
    for name, value in ref.named_parameters():
        assert torch.equal(value, getattr(copied, name)), name


@pytest.mark.parametrize("rate", [0.0, 0.5])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_init_range_bounds_every_recurrent_tensor(cell, rate):
    """Default: U(-1/sqrt(m), 1/sqrt(m)) with m = H/K, so the bound grows with K; with
    ``init_range`` R every K draws from U(-R, R).  Each tensor must reach close to its
    bound (1,000+ draws) and never pass it."""
    h = 64
    for k in (1, 4, 16):
        for init_range, bound in ((None, (h // k) ** -0.5), (0.1, 0.1), (0.5, 0.5)):
            torch.manual_seed(k)
            stack = RecurrentStack(64, h, num_layers=2, cell=cell, groups=k, sharing_rate=rate,
                                   init_range=init_range)
            params = dict(stack.named_parameters())
            assert params, "no parameters"
            for name, p in params.items():
                top = p.detach().abs().max().item()
                assert top <= bound, (k, init_range, name, top, bound)
                if p.numel() >= 1000:
                    assert top > 0.99 * bound, (k, init_range, name, top, bound)


def test_group_count_must_divide_the_input_width_too():
    with pytest.raises(ValueError, match="groups=4 does not divide input_size=6.*use groups in"):
        RecurrentStack(6, 8, groups=4)


def test_group_count_must_divide_the_hidden_width():
    with pytest.raises(ValueError, match="groups=3 does not divide hidden_size=8"):
        RecurrentStack(9, 8, groups=3)


@pytest.mark.parametrize("groups,layers", [(4, 2), (4, 1), (1, 2)])
def test_state_dict_refuses_exactly_the_rearrangements_that_change_outputs(groups, layers):
    """A state dict records the stack's rearrangement (its weight shapes do not show it):
    loading it into a stack built with another mode fails with the mode to use, exactly when
    the two would compute different outputs with the same weights (K=1 and one layer make
    some modes the same).  A state dict without the record (saved before it existed) loads."""
    modes = ("none", "layer", "time", "both")
    x = torch.randn(5, 3, 8)
    for trained in modes:
        torch.manual_seed(0)
        src = RecurrentStack(8, 8, num_layers=layers, groups=groups, rearrangement=trained)
        saved = src.state_dict()
        legacy = {k: v for k, v in saved.items() if k != "shuffles"}
        for built in modes:
            dst = RecurrentStack(8, 8, num_layers=layers, groups=groups, rearrangement=built)
            dst.load_state_dict(legacy)
            same = torch.equal(src(x)[0], dst(x)[0])
            if same:
                dst.load_state_dict(saved)
            else:
                with pytest.raises(ValueError, match=rf"trained with rearrangement [^\n]*'{trained}'"
                                   rf".*built with rearrangement='{built}'.*--rearrangement"):
                    dst.load_state_dict(saved)
        if groups > 1:  # the record survives a cast to half precision
            RecurrentStack(8, 8, num_layers=layers, groups=groups,
                           rearrangement=trained).load_state_dict(src.half().state_dict())
