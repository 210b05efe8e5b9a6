"""The SE blocks' PyTorch fast path (scse_seg.kernels.fast_se) against their eager formulas.

The reference is the same block with ``fused=False`` (the plain formulas, differentiated by
autograd). Both backends of the fast path are checked: ``ops`` for every mode, dim and layout;
``compile`` (inductor) on a subset, since each (mode, dim, dtype, layout) costs a compilation.
"""
from __future__ import annotations

import copy

import pytest
import torch

from scse_seg.blocks import ChannelSE, ConcurrentSE, SpatialSE
from scse_seg.kernels import fast_se

MODES = ["cse", "sse", "scse_max", "scse_add"]
SHAPES = {2: (3, 5, 7, 9), 3: (2, 5, 3, 7, 4)}  # odd sizes everywhere


def _block(mode: str, channels: int, dim: int, dtype=torch.float64):
    if mode == "cse":
        m = ChannelSE(channels, dim, fused=False)
    elif mode == "sse":
        m = SpatialSE(channels, dim, fused=False)
    else:
        m = ConcurrentSE(channels, dim, fusion=mode.split("_")[1], fused=False)
    m = m.to(dtype)
    with torch.no_grad():  # non-trivial biases, gates away from 0/1
        for p in m.parameters():
            p.normal_(0, 0.5)
    return m


def _layout(x, layout):
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last if x.dim() == 4
                            else torch.channels_last_3d)
    return x


def _compare(mode, dim, layout, backend, dtype=torch.float64):
    torch.manual_seed(0)
    shape = SHAPES[dim]
    m = _block(mode, shape[1], dim, dtype)
    x = torch.randn(shape, dtype=dtype)
    x[torch.rand(shape) < 0.2] = 0  # ReLU-like zeros: ties of the max fusion (half/half)
    x = _layout(x, layout)
    dy = torch.randn(shape, dtype=dtype)
    params = list(m.parameters())
    xf, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    yf = fast_se.fast_se(xf, m, mode, backend=backend)
    gf = torch.autograd.grad(yf, [xf, *params], dy)
    ye = m(xe)
    ge = torch.autograd.grad(ye, [xe, *params], dy)
    assert yf.stride() == x.stride() and gf[0].stride() == x.stride(), "memory format kept"
    assert yf.dtype == dtype and gf[0].dtype == dtype
    return max([(yf - ye).abs().max().item()] + [(a - b).abs().max().item() for a, b in zip(gf, ge)])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("mode", MODES)
def test_ops_backend_matches_eager(mode, dim, layout):
    assert _compare(mode, dim, layout, "ops") < 1e-6
    assert _compare(mode, dim, layout, "ops", torch.float32) < 1e-4


@pytest.mark.parametrize("chunk", [15, 500])  # 1 position per chunk; 33 positions
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("mode", MODES)
def test_ops_backend_in_chunks_matches_eager(mode, layout, chunk, monkeypatch):
    """The ops backend cut into many chunks (cSE's gate gradient summed across them, sSE's
    weight gradient too): still the eager result. 2D 3x5x7x9 (N*C = 15 per position, 63
    positions): a chunk of 15 elements is 1 position (63 chunks), one of 500 is 33 positions
    (2 chunks, the second of 30)."""
    from scse_seg.kernels import chunked_se

    monkeypatch.setenv("SCSE_SEG_CHUNK", str(chunk))
    assert chunked_se.positions_per_chunk(3, 5, 63, chunk) == (1 if chunk == 15 else 33)
    assert _compare(mode, 2, layout, "ops") < 1e-6
    assert _compare(mode, 3, layout, "ops", torch.float32) < 1e-4


def test_ops_backend_takes_a_gradient_in_another_layout(monkeypatch):
    """dy in NCHW for a channels_last map (and the reverse): dx keeps the map's layout."""
    monkeypatch.setenv("SCSE_SEG_CHUNK", "40")
    torch.manual_seed(1)
    m = _block("scse_max", 5, 2)
    for x_layout, dy_layout in (("channels_last", "contiguous"), ("contiguous", "channels_last")):
        x = _layout(torch.randn(SHAPES[2], dtype=torch.float64), x_layout)
        dy = _layout(torch.randn(SHAPES[2], dtype=torch.float64), dy_layout)
        xf, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        (gf,) = torch.autograd.grad(fast_se.fast_se(xf, m, "scse_max", "ops"), [xf], dy)
        (ge,) = torch.autograd.grad(m(xe), [xe], dy)
        assert gf.stride() == x.stride() and (gf - ge).abs().max() < 1e-9


@pytest.mark.parametrize("mode,dim,layout", [("scse_max", 2, "contiguous"),
                                             ("scse_add", 3, "channels_last"),
                                             ("sse", 2, "channels_last")])
def test_compile_backend_matches_eager(mode, dim, layout):
    assert _compare(mode, dim, layout, "compile") < 1e-6


def test_all_ties_split_like_torch_maximum():
    """Zero-initialised gate weights make g_c == g_s everywhere: every element is a tie of the
    max fusion, and the gradient splits half/half exactly as torch.maximum's backward does."""
    m = _block("scse_max", 4, 2)
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    for backend in ("ops", "compile"):
        xf, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        gf = torch.autograd.grad(fast_se.fast_se(xf, m, "scse_max", backend).sum(),
                                 [xf, *m.parameters()])
        ge = torch.autograd.grad(m(xe).sum(), [xe, *m.parameters()])
        assert max((a - b).abs().max().item() for a, b in zip(gf, ge)) < 1e-9, backend


def test_max_route_ambiguous_marks_near_ties_where_the_gradient_jumps():
    """A map element with g_c within 1e-7 of g_s: the max fusion's gradient jumps there (moving
    sse's bias by 1e-5 across the tie moves a whole dy*x term between the gate gradients), so
    comparisons of two precisions zero dy there; with that, fp32 matches fp64."""
    torch.manual_seed(3)
    m = _block("scse_max", 2, 2)
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64)
    ex, conv = m.cse.excite, m.sse.conv
    gc = torch.sigmoid(ex.fc2(torch.relu(ex.fc1(x.mean((2, 3))))))[0]  # (C,) by hand
    dot = (conv.weight.reshape(2, 1, 1) * x[0]).sum(0)  # (H, W) bias-free sSE logit
    with torch.no_grad():  # put g_s at pixel (0, 0) 1e-7 above g_c of channel 0
        conv.bias.fill_((torch.logit(gc[0] + 1e-7) - dot[0, 0]).item())
    gs = torch.sigmoid(dot + conv.bias)
    expected = ((gc.reshape(1, 2, 1, 1) - gs.reshape(1, 1, 3, 4)).abs() < 1e-4) & (x != 0)
    params = fast_se.module_params(m, "scse_max")
    mask = fast_se.max_route_ambiguous(x, "scse_max", **params)
    assert mask[0, 0, 0, 0] and torch.equal(mask, expected)
    assert fast_se.max_route_ambiguous(x, "scse_add", **params) is None
    dy = torch.randn_like(x)

    def grads(block, xx, g):
        xx = xx.clone().requires_grad_()
        return torch.autograd.grad(block(xx), [xx, *block.parameters()], g)

    shifted = copy.deepcopy(m)
    with torch.no_grad():
        shifted.sse.conv.bias -= 1e-5  # g_s ~2e-6 lower, across g_c: the routing flips
    jump = max((a - b).abs().max().item() for a, b in zip(grads(m, x, dy), grads(shifted, x, dy)))
    assert jump > 1e-3 * abs(dy[0, 0, 0, 0].item() * x[0, 0, 0, 0].item())
    dy = dy.masked_fill(mask, 0)
    ref = grads(m, x, dy)
    m32 = copy.deepcopy(m).float()
    x32 = x.float().requires_grad_()
    got = torch.autograd.grad(fast_se.fast_se(x32, m32, "scse_max", "ops"),
                              [x32, *m32.parameters()], dy.float())
    for a, b in zip(got, ref):
        assert (a.double() - b).abs().max().item() <= 1e-5 * b.abs().max().item()


def _saved(fn, x):
    """Bytes and shapes of every tensor autograd saves for backward while ``fn(x)`` runs."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return shapes


def test_scse_saves_only_its_input_and_the_gates():
    m = ConcurrentSE(8, 2)  # fused=True: the fast path on CPU
    ref = copy.deepcopy(m)
    ref.fused = False
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    fast = [s for s in _saved(m, x) if s == tuple(x.shape)]
    eager = [s for s in _saved(ref, x) if s == tuple(x.shape)]
    assert len(fast) == 1, f"one map-sized saved tensor (x), got {len(fast)}"
    assert len(eager) >= 3, "the counter sees the eager path's products (sanity)"


def test_blocks_default_to_fast_path_and_switch_off(monkeypatch):
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    m = ConcurrentSE(4, 2)
    assert "SEFunction" in type(m(x).grad_fn).__name__
    monkeypatch.setenv("SCSE_SEG_FUSED", "0")
    assert "SEFunction" not in type(m(x).grad_fn).__name__  # plain eager formulas


def test_small_maps_take_the_eager_formulas_on_cpu(monkeypatch):
    """Below fast_se.MIN_ELEMENTS (map elements) a block runs its eager formulas; from it on,
    the fast path. conftest sets SCSE_SEG_FAST_MIN=0 for the rest of the suite."""
    monkeypatch.delenv("SCSE_SEG_FAST_MIN", raising=False)
    monkeypatch.setenv("SCSE_SEG_FAST", "ops")
    for mode in MODES:
        assert fast_se.min_elements(mode) == fast_se.MIN_ELEMENTS["ops"][mode]
    monkeypatch.setitem(fast_se.MIN_ELEMENTS["ops"], "scse_max", 2 * 4 * 6 * 6)
    m = ConcurrentSE(4, 2)
    at = torch.randn(2, 4, 6, 6, requires_grad=True)  # 288 elements: the threshold itself
    below = torch.randn(2, 4, 6, 5, requires_grad=True)  # 240
    assert "SEFunction" in type(m(at).grad_fn).__name__
    assert "SEFunction" not in type(m(below).grad_fn).__name__
    y = m(below)  # the eager result is the block's, gradients included
    ref = copy.deepcopy(m)
    ref.fused = False
    assert torch.equal(y, ref(below))
    monkeypatch.setenv("SCSE_SEG_FAST_MIN", "1000")  # the override wins over the table
    assert "SEFunction" not in type(m(at).grad_fn).__name__
    monkeypatch.setenv("SCSE_SEG_FAST_MIN", "0")
    assert "SEFunction" in type(m(below).grad_fn).__name__
    monkeypatch.setenv("SCSE_SEG_FAST_MIN", "many")
    with pytest.raises(ValueError, match="SCSE_SEG_FAST_MIN"):
        m(at)


@pytest.mark.parametrize("backend,chunk", [("ops", "0"), ("ops", "100"), ("compile", "0")])
def test_autocast_bf16_on_cpu(backend, chunk, monkeypatch):
    monkeypatch.setenv("SCSE_SEG_FAST", backend)
    monkeypatch.setenv("SCSE_SEG_CHUNK", chunk)  # 100: 20 chunks of 6 positions (gradients
    #                                              summed over chunks in fp32, not bf16)
    torch.manual_seed(0)
    m = ConcurrentSE(8, 2)
    ref = copy.deepcopy(m)
    ref.fused = False
    x = torch.randn(2, 8, 10, 12).to(torch.bfloat16)
    outs = []
    for block in (m, ref):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = block(xi)
        outs.append((y, *torch.autograd.grad(y.float().sum(), [xi, *block.parameters()])))
    for a, b in zip(*outs):
        assert a.dtype == b.dtype
        scale = b.double().abs().max().clamp_min(1e-6)  # dead ReLU units: zero fc1 gradients
        assert ((a.double() - b.double()).abs().max() / scale).item() < 5e-2


@pytest.mark.parametrize("backend", ["ops", "compile"])
def test_deterministic_mode_bit_exact(backend, monkeypatch):
    monkeypatch.setenv("SCSE_SEG_FAST", backend)
    torch.manual_seed(0)
    m = ConcurrentSE(8, 3)
    x = torch.randn(2, 8, 4, 5, 6)
    runs = []
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(2):
            xi = x.clone().requires_grad_()
            y = m(xi)
            runs.append([y, *torch.autograd.grad(y.square().sum(), [xi, *m.parameters()])])
    finally:
        torch.use_deterministic_algorithms(prev)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_torch_compile_fullgraph_and_export():
    """Traced by torch.compile / torch.export, the blocks run their plain formulas (which the
    compiler fuses), so fullgraph compilation and export both work; results match eager."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), ConcurrentSE(8, 2))
    x = torch.randn(2, 3, 8, 8)
    y = m(x)
    yc = torch.compile(m, backend="aot_eager", fullgraph=True)(x)
    assert torch.allclose(y, yc, atol=1e-5)
    ep = torch.export.export(m, (x,))
    assert torch.allclose(y, ep.module()(x), atol=1e-5)


def test_ddp_single_process(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        torch.manual_seed(0)
        m = ConcurrentSE(8, 2)
        ref = copy.deepcopy(m)
        ref.fused = False
        ddp = DistributedDataParallel(m)
        x = torch.randn(2, 8, 6, 6)
        ddp(x).square().sum().backward()
        ref(x).square().sum().backward()
        for a, b in zip(m.parameters(), ref.parameters()):
            assert torch.allclose(a.grad, b.grad, atol=1e-5)
    finally:
        dist.destroy_process_group()


def test_unknown_backend_is_refused(monkeypatch):
    monkeypatch.setenv("SCSE_SEG_FAST", "numba")
    with pytest.raises(ValueError, match="SCSE_SEG_FAST"):
        fast_se.backend_name()


def test_compile_failure_falls_back_to_ops_once(monkeypatch):
    """No C++ compiler (or any inductor error): one warning, then the ops backend, same result."""
    def broken(fn, key):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setattr(fast_se, "_compiled", broken)
    monkeypatch.setattr(fast_se, "_COMPILE_FAILED", [])
    m = _block("scse_add", 5, 2)
    x = torch.randn(2, 5, 4, 6, dtype=torch.float64, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="using SCSE_SEG_FAST=ops instead") as rec:
        y = fast_se.fast_se(x, m, "scse_add", backend="compile")
        y.sum().backward()
    assert len([w for w in rec if "SCSE_SEG_FAST" in str(w.message)]) == 1
    assert torch.allclose(y, m(x))
