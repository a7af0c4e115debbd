"""Tests for logical-matrix views (``muonlab.views``)."""

from __future__ import annotations

import pytest
import torch

from muonlab.views import View, auto_view, blocks, check_view, matrix_shapes, parse_view


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


# ---------------------------------------------------------------------- parsing
@pytest.mark.parametrize("spec,view", [
    ("matrix", View("matrix")),
    ("flatten", View("flatten")),
    ("experts", View("experts")),
    ("heads:8", View("heads", heads=8)),
    ("heads:4:1", View("heads", heads=4, dim=1)),
    ("heads:4:0", View("heads", heads=4, dim=0)),
    ("split:512,128,128", View("split", sizes=(512, 128, 128))),
    ("split:7", View("split", sizes=(7,))),
    (" Matrix ", View("matrix")),
    ("T", View("matrix", transposed=True)),
    ("t:matrix", View("matrix", transposed=True)),
    ("T:flatten", View("flatten", transposed=True)),
    ("experts:T", View("experts", transposed=True)),
    ("experts:matrix", View("experts")),
    ("T:heads:4:1", View("heads", heads=4, dim=1, transposed=True)),
    ("T:split:3,5", View("split", sizes=(3, 5), transposed=True)),
    ("experts:heads:2", View("heads", heads=2, experts=True)),
    ("experts:split:6,6", View("split", sizes=(6, 6), experts=True)),
    ("experts:T:split:6,6", View("split", sizes=(6, 6), experts=True, transposed=True)),
])
def test_parse_view(spec, view):
    assert parse_view(spec) == view


@pytest.mark.parametrize("spec", ["matrix", "flatten", "experts", "heads:8", "heads:4:1", "split:3,2,1", "T",
                                  "T:flatten", "experts:T", "T:heads:2", "experts:heads:2:1", "experts:T:split:3,2"])
def test_view_str_round_trips(spec):
    assert str(parse_view(spec)) == spec
    assert parse_view(str(parse_view(spec))) == parse_view(spec)


@pytest.mark.parametrize("spec", [
    "", "rows", "heads", "heads:0", "heads:-2", "heads:x", "heads:4:2", "heads:4:1:1",
    "split", "split:", "split:0,4", "split:4,-1", "split:a,b", "matrix:2", "experts:4",
    "T:", "T:T", "experts:experts", "T:experts", "experts:flatten", "transpose", "experts:T:heads",
])
def test_parse_errors(spec):
    with pytest.raises(ValueError, match="invalid view") as info:
        parse_view(spec)
    assert repr(spec) in str(info.value)


def test_parse_rejects_non_strings():
    with pytest.raises(TypeError, match="string"):
        parse_view(8)  # type: ignore[arg-type]


@pytest.mark.parametrize("shape,view", [((4, 5), "matrix"), ((3, 4, 5), "experts"), ((8, 3, 3, 3), "flatten"),
                                        ((2, 2, 2, 2, 2), "flatten")])
def test_auto_view(shape, view):
    assert auto_view(shape) == view
    check_view(view, shape)


@pytest.mark.parametrize("shape", [(5,), ()])
def test_auto_view_rejects_vectors(shape):
    with pytest.raises(ValueError, match=rf"{len(shape)}-D tensor of shape {shape}".replace("(", r"\(").replace(")", r"\)")):
        auto_view(shape)


# ---------------------------------------------------------------------- blocks are views that write through
def test_matrix_blocks_write_through():
    t = torch.zeros(4, 6)
    (b,) = blocks(t, "matrix")
    assert b.shape == (1, 4, 6) and _shares_storage(b, t)
    b[0, 1, 2] = 5.0
    assert t[1, 2] == 5.0


def test_flatten_blocks_write_through():
    t = torch.arange(4 * 3 * 2 * 2, dtype=torch.float32).reshape(4, 3, 2, 2)
    (b,) = blocks(t, "flatten")
    assert b.shape == (1, 4, 12) and _shares_storage(b, t)
    assert torch.equal(b[0], t.reshape(4, 12))
    b[0, 3].fill_(-1.0)
    assert (t[3] == -1).all() and (t[:3] >= 0).all()


def test_experts_blocks_write_through():
    t = torch.randn(3, 4, 5)
    (b,) = blocks(t, "experts")
    assert b.shape == (3, 4, 5) and _shares_storage(b, t)
    b[1].zero_()
    assert not t[1].any() and t[0].any()


def test_heads_blocks_split_rows_and_write_through():
    t = torch.arange(8 * 6, dtype=torch.float32).reshape(8, 6)
    (b,) = blocks(t, "heads:4")
    assert b.shape == (4, 2, 6) and _shares_storage(b, t)
    for h in range(4):
        assert torch.equal(b[h], t[2 * h:2 * h + 2])
    b[2].fill_(100.0)
    assert (t[4:6] == 100).all() and (t[:4] < 100).all() and (t[6:] < 100).all()
    # copy_ into the whole block stack (as the optimizer does) writes the parameter
    src = torch.randn(4, 2, 6)
    b.copy_(src)
    assert torch.equal(t, src.reshape(8, 6))


def test_heads_dim1_blocks_split_columns_and_write_through():
    t = torch.arange(4 * 6, dtype=torch.float32).reshape(4, 6)
    (b,) = blocks(t, "heads:2:1")
    assert b.shape == (2, 4, 3) and _shares_storage(b, t)
    for h in range(2):
        assert torch.equal(b[h], t[:, 3 * h:3 * h + 3])
    b[1].fill_(-7.0)
    assert (t[:, 3:] == -7).all() and (t[:, :3] >= 0).all()
    src = torch.randn(2, 4, 3)
    b.copy_(src)
    assert torch.equal(t, torch.cat([src[0], src[1]], dim=1))


def test_split_blocks_write_through():
    t = torch.arange(6 * 4, dtype=torch.float32).reshape(6, 4)
    parts = blocks(t, "split:2,3,1")
    assert [tuple(p.shape) for p in parts] == [(1, 2, 4), (1, 3, 4), (1, 1, 4)]
    assert all(_shares_storage(p, t) for p in parts)
    assert torch.equal(parts[1][0], t[2:5])
    parts[1].fill_(0.5)
    parts[2].fill_(-0.5)
    assert (t[2:5] == 0.5).all() and (t[5] == -0.5).all() and torch.equal(t[:2], torch.arange(8.0).reshape(2, 4))


# ---------------------------------------------------------------------- shapes
@pytest.mark.parametrize("shape,spec,expected", [
    ((64, 32), "matrix", [(1, 64, 32)]),
    ((16, 3, 3, 3), "flatten", [(1, 16, 27)]),
    ((8, 4, 3, 5), "flatten", [(1, 8, 60)]),
    ((4, 16, 32), "experts", [(4, 16, 32)]),
    ((64, 32), "heads:8", [(8, 8, 32)]),
    ((32, 64), "heads:8:1", [(8, 32, 8)]),
    ((96, 32), "split:32,32,32", [(1, 32, 32)] * 3),
    ((48, 32), "split:32,8,8", [(1, 32, 32), (1, 8, 32), (1, 8, 32)]),
])
def test_matrix_shapes(shape, spec, expected):
    assert matrix_shapes(shape, spec) == expected
    assert [tuple(b.shape) for b in blocks(torch.empty(shape), spec)] == expected


# ---------------------------------------------------------------------- check_view errors
@pytest.mark.parametrize("spec,shape,message", [
    ("matrix", (4, 5, 6), r"w with shape \(4, 5, 6\): view 'matrix' needs a 2-D tensor"),
    ("experts", (4, 5), r"w with shape \(4, 5\): view 'experts' needs a 3-D"),
    ("heads:4", (30, 8), r"w with shape \(30, 8\): view 'heads:4' does not divide dim 0 of size 30 into 4 heads"),
    ("heads:3:1", (6, 8), r"w with shape \(6, 8\): view 'heads:3:1' does not divide dim 1 of size 8 into 3 heads"),
    ("heads:2", (4, 4, 4), r"w with shape \(4, 4, 4\): view 'heads:2' needs a 2-D tensor"),
    ("split:4,4", (9, 3), r"w with shape \(9, 3\): view 'split:4,4' sizes sum to 8, not dim 0 = 9"),
    ("split:4,4", (8, 3, 2), r"w with shape \(8, 3, 2\): view 'split:4,4' needs a 2-D tensor"),
    ("matrix", (7,), r"w with shape \(7,\): Muon needs a matrix, but the tensor is 1-D"),
    ("flatten", (), r"w with shape \(\): Muon needs a matrix, but the tensor is 0-D"),
    ("diag", (4, 4), r"invalid view 'diag'"),
    ("T", (4, 5, 6), r"w with shape \(4, 5, 6\): view 'T' needs a 2-D tensor"),
    ("experts:T", (4, 5), r"w with shape \(4, 5\): view 'experts:T' needs a 3-D"),
    ("experts:split:2,2", (3, 5, 4), r"sizes sum to 4, not dim 0 of the logical \(fan_out, fan_in\) matrix 5x4 = 5"),
    ("T:split:4,4", (8, 3), r"view 'T:split:4,4' sizes sum to 8, not dim 0 of the logical .* matrix 3x8 = 3"),
    ("T:heads:4", (8, 6), r"view 'T:heads:4' does not divide dim 0 of the logical .* matrix 6x8 of size 6 into 4 heads"),
    ("experts:heads:3:1", (2, 6, 8), r"does not divide dim 1 of the logical .* matrix 6x8 of size 8 into 3 heads"),
])
def test_check_view_errors_name_parameter_and_shape(spec, shape, message):
    with pytest.raises(ValueError, match=message):
        check_view(spec, shape, "w")


def test_check_view_accepts_valid_and_returns_the_view():
    assert check_view("heads:4", torch.Size([32, 8])) == View("heads", heads=4)
    assert check_view("split:3,5", (8, 2)).sizes == (3, 5)
    assert check_view("flatten", (8, 2, 3)).kind == "flatten"  # 3-D conv1d kernels flatten too


# ---------------------------------------------------------------------- boxes (sharded engine geometry)
@pytest.mark.parametrize("shape,spec", [
    ((6, 4), "matrix"), ((4, 6), "matrix"), ((5, 3, 2, 2), "flatten"), ((3, 4, 5), "experts"),
    ((12, 5), "heads:3"), ((5, 12), "heads:4:1"), ((9, 4), "split:2,3,4"), ((7, 2), "split:7"),
    # transposed storage and compositions with expert stacks
    ((4, 6), "T"), ((3, 5, 2, 2), "T:flatten"), ((3, 4, 5), "experts:T"), ((5, 12), "T:heads:3"),
    ((12, 5), "T:heads:4:1"), ((4, 9), "T:split:2,3,4"), ((3, 8, 5), "experts:split:3,5"),
    ((3, 5, 8), "experts:T:split:3,5"), ((2, 6, 4), "experts:heads:3"), ((2, 4, 6), "experts:heads:2:1"),
    ((2, 4, 6), "experts:T:heads:2"), ((2, 6, 4), "experts:T:heads:2:1"),
])
def test_matrix_boxes_cut_the_same_matrices_as_blocks(shape, spec):
    from muonlab.views import matrix_boxes

    idx = torch.arange(torch.Size(shape).numel()).view(shape)  # each element's own flat index
    want = [m for b in blocks(idx, spec) for m in b.unbind(0)]
    boxes = matrix_boxes(shape, spec)
    assert len(boxes) == len(want)
    for box, m in zip(boxes, want):
        got = idx[box.slices()].reshape(box.shape2d)
        got = got.mT if box.transposed else got
        assert box.logical_shape == tuple(m.shape)
        assert torch.equal(got, m), (spec, box)


# ---------------------------------------------------------------------- transposed storage (T) and stacks
def test_transposed_blocks_are_the_logical_matrix_and_write_through():
    t = torch.arange(4 * 6, dtype=torch.float32).reshape(4, 6)  # stored (in=4, out=6)
    (b,) = blocks(t, "T")
    assert b.shape == (1, 6, 4) and _shares_storage(b, t)
    assert torch.equal(b[0], t.T)
    b[0, 5].fill_(-1.0)  # logical row 5 = output 5 = stored column 5
    assert (t[:, 5] == -1).all() and (t[:, :5] >= 0).all()
    src = torch.randn(1, 6, 4)
    b.copy_(src)
    assert torch.equal(t, src[0].T)


def test_transposed_split_cuts_stored_columns():
    t = torch.arange(4 * 9, dtype=torch.float32).reshape(4, 9)  # a GPT-2 style fused c_attn: (in, 3*out)
    parts = blocks(t, "T:split:3,3,3")
    assert [tuple(p.shape) for p in parts] == [(1, 3, 4)] * 3
    for i, p in enumerate(parts):
        assert torch.equal(p[0], t[:, 3 * i:3 * i + 3].T) and _shares_storage(p, t)
    assert matrix_shapes((4, 9), "T:heads:3") == [(3, 3, 4)]


def test_expert_stack_views_split_fused_gate_up_and_write_through():
    E, inter, hidden = 3, 4, 5
    t = torch.randn(E, 2 * inter, hidden)  # (E, out, in) with gate and up concatenated along out
    gate, up = blocks(t, f"experts:split:{inter},{inter}")
    assert gate.shape == up.shape == (E, inter, hidden)
    assert torch.equal(gate, t[:, :inter]) and torch.equal(up, t[:, inter:])
    up.zero_()
    assert not t[:, inter:].any() and t[:, :inter].any()
    stored_t = torch.randn(E, hidden, 2 * inter)  # (E, in, out): the same layer stored transposed
    gate_t, up_t = blocks(stored_t, f"experts:T:split:{inter},{inter}")
    assert torch.equal(gate_t, stored_t[:, :, :inter].mT) and _shares_storage(gate_t, stored_t)
    assert matrix_shapes((E, hidden, 2 * inter), "experts:T") == [(E, 2 * inter, hidden)]
    assert matrix_shapes((E, 8, hidden), "experts:heads:4") == [(E, 2, hidden)] * 4


def test_optimizer_steps_a_transposed_view_as_the_transpose_of_the_plain_one():
    """The optimizer reads views only through blocks(): a parameter stored (in, out) under 'T' (or
    (E, in, out) under 'experts:T', or a fused stack under 'experts:split') must take exactly the step
    of the same weights stored (out, in); NorMuon and 'spectral' scaling make orientation matter."""
    from muonlab import Muon

    torch.manual_seed(0)
    opts = dict(lr=0.1, momentum=0.9, ns_method="svd", normuon=True, adjust_lr_fn="spectral", weight_decay=0.01)
    w = torch.randn(12, 5)  # (out, in)
    ex = torch.randn(3, 8, 4)  # (E, out, in); rows 0-3 gate, 4-7 up
    plain = [torch.nn.Parameter(w.clone()), torch.nn.Parameter(ex.clone()),
             torch.nn.Parameter(ex[:, :4].clone()), torch.nn.Parameter(ex[:, 4:].clone())]
    stored = [torch.nn.Parameter(w.T.clone()), torch.nn.Parameter(ex.mT.clone()), torch.nn.Parameter(ex.clone())]
    a = Muon([{"params": plain, "algorithm": "muon", "views": ["matrix", "experts", "experts", "experts"]}], **opts)
    b = Muon([{"params": stored, "algorithm": "muon", "views": ["T", "experts:T", "experts:split:4,4"]}], **opts)
    for _ in range(3):
        gw, gx = torch.randn(12, 5), torch.randn(3, 8, 4)
        for p, g in zip(plain, (gw, gx, gx[:, :4], gx[:, 4:])):
            p.grad = g.clone()
        for p, g in zip(stored, (gw.T, gx.mT, gx)):
            p.grad = g.clone()
        a.step()
        b.step()
    torch.testing.assert_close(stored[0].detach(), plain[0].detach().T)
    torch.testing.assert_close(stored[1].detach(), plain[1].detach().mT)
    torch.testing.assert_close(stored[2].detach(), torch.cat([plain[2], plain[3]], dim=1).detach())
    # and the report reads the logical orientation
    rows = {r.view: r.matrices for r in b.routing_report().rows}
    assert rows == {"T": "1x(12, 5)", "experts:T": "3x(8, 4)", "experts:split:4,4": "6x(4, 4)"}
