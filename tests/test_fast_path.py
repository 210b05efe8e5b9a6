"""The scSE CPU fast path (scse_seg.kernels.cpu_se) against the blocks' eager formulas.

The reference is the same block with ``fused=False`` (its plain formulas, differentiated by
autograd): forward and every gradient, both fusions, 2D and 3D, both layouts, fp64 and fp32,
one chunk and many. Plus the rule that picks the path (scSE in training only; the one switch
``SCSE_SEG_FUSED=0``), what it saves for backward, and the tracers.
"""
from __future__ import annotations

import copy

import pytest
import torch

from scse_seg.blocks import ChannelSE, ConcurrentSE, SpatialSE
from scse_seg.kernels import cpu_se
from scse_seg.kernels.gates import module_params
from scse_seg.kernels.selfcheck import max_route_ambiguous, reference_block

MODES = list(cpu_se.MODES)
SHAPES = {2: (3, 5, 7, 9), 3: (2, 5, 3, 7, 4)}  # odd sizes everywhere


def _layout(x, layout):
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last if x.dim() == 4
                            else torch.channels_last_3d)
    return x


def _fast(x, block, mode):
    return cpu_se.se_function(x, mode, **module_params(block, mode))


def _compare(mode, dim, layout, dtype=torch.float64, dy_layout=None):
    torch.manual_seed(0)
    shape = SHAPES[dim]
    m = reference_block(mode, shape[1], dim, dtype, seed=0)
    x = torch.randn(shape, dtype=dtype)
    x[torch.rand(shape) < 0.2] = 0  # ReLU-like zeros: ties of the max fusion (half/half)
    x = _layout(x, layout)
    dy = _layout(torch.randn(shape, dtype=dtype), dy_layout or layout)
    params = list(m.parameters())
    xf, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    yf = _fast(xf, m, mode)
    gf = torch.autograd.grad(yf, [xf, *params], dy)
    ye = m(xe)
    ge = torch.autograd.grad(ye, [xe, *params], dy)
    assert yf.stride() == x.stride() and gf[0].stride() == x.stride(), "memory format kept"
    assert yf.dtype == dtype and gf[0].dtype == dtype
    return max([(yf - ye).abs().max().item()] + [(a - b).abs().max().item() for a, b in zip(gf, ge)])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("mode", MODES)
def test_matches_eager_formulas(mode, dim, layout):
    assert _compare(mode, dim, layout) < 1e-6
    assert _compare(mode, dim, layout, torch.float32) < 1e-4


@pytest.mark.parametrize("per_thread", [1, 200])  # a chunk of 1 position; of 200 // 15 = 13
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("mode", MODES)
def test_many_chunks_match_eager_formulas(mode, layout, per_thread, monkeypatch):
    """Cut into many chunks (cSE's gate gradient and sSE's weight gradient summed across them):
    still the eager result. 2D 3x5x7x9 has N*C = 15 elements per position."""
    monkeypatch.setattr(cpu_se, "CHUNK_ELEMENTS_PER_THREAD", per_thread)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert cpu_se._Chunks(torch.empty(SHAPES[2])).step == (1 if per_thread == 1 else 13)
    assert _compare(mode, 2, layout) < 1e-6
    assert _compare(mode, 3, layout, torch.float32) < 1e-4


@pytest.mark.parametrize("x_layout,dy_layout", [("channels_last", "contiguous"),
                                                ("contiguous", "channels_last")])
def test_gradient_in_another_layout(x_layout, dy_layout):
    """dy in NCHW for a channels_last map (and the reverse): dx keeps the map's layout."""
    assert _compare("scse_max", 2, x_layout, dy_layout=dy_layout) < 1e-9


def test_all_ties_split_like_torch_maximum():
    """Zero gate weights make g_c == g_s everywhere: every element is a tie of the max fusion,
    and the gradient splits half/half exactly as torch.maximum's backward does."""
    m = reference_block("scse_max", 4, 2)
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    xf, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    gf = torch.autograd.grad(_fast(xf, m, "scse_max").sum(), [xf, *m.parameters()])
    ge = torch.autograd.grad(m(xe).sum(), [xe, *m.parameters()])
    assert max((a - b).abs().max().item() for a, b in zip(gf, ge)) < 1e-9


def test_max_route_ambiguous_marks_near_ties_where_the_gradient_jumps():
    """A map element with g_c within 1e-7 of g_s: the max fusion's gradient jumps there (moving
    sse's bias by 1e-5 across the tie moves a whole dy*x term between the gate gradients), so
    comparisons of two precisions zero dy there; with that, fp32 matches fp64."""
    torch.manual_seed(3)
    m = reference_block("scse_max", 2, 2, seed=3)
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64)
    ex, conv = m.cse.excite, m.sse.conv
    gc = torch.sigmoid(ex.fc2(torch.relu(ex.fc1(x.mean((2, 3))))))[0]  # (C,) by hand
    dot = (conv.weight.reshape(2, 1, 1) * x[0]).sum(0)  # (H, W) bias-free sSE logit
    with torch.no_grad():  # put g_s at pixel (0, 0) 1e-7 above g_c of channel 0
        conv.bias.fill_((torch.logit(gc[0] + 1e-7) - dot[0, 0]).item())
    gs = torch.sigmoid(dot + conv.bias)
    expected = ((gc.reshape(1, 2, 1, 1) - gs.reshape(1, 1, 3, 4)).abs() < 1e-4) & (x != 0)
    mask = max_route_ambiguous(m, x)
    assert mask[0, 0, 0, 0] and torch.equal(mask, expected)
    assert max_route_ambiguous(reference_block("scse_add", 2, 2), x) is None
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
    got = torch.autograd.grad(_fast(x32, m32, "scse_max"), [x32, *m32.parameters()], dy.float())
    for a, b in zip(got, ref):
        assert (a.double() - b).abs().max().item() <= 1e-5 * b.abs().max().item()


def _saved(fn, x):
    """Shapes of every tensor autograd saves for backward while ``fn(x)`` runs."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return shapes


@pytest.mark.parametrize("fusion,eager_maps", [("max", 3), ("add", 2)])
def test_scse_saves_only_its_input_and_the_gates(fusion, eager_maps):
    m = ConcurrentSE(8, 2, fusion=fusion)  # fused=True: the fast path on CPU
    ref = copy.deepcopy(m)
    ref.fused = False
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    fast = [s for s in _saved(m, x) if s == tuple(x.shape)]
    eager = [s for s in _saved(ref, x) if s == tuple(x.shape)]
    assert len(fast) == 1, f"one map-sized saved tensor (x), got {len(fast)}"
    assert len(eager) >= eager_maps, "the counter sees eager's products (sanity)"


def _path(block, x):
    return "fast" if "SEFunction" in type(block(x).grad_fn).__name__ else "eager"


def test_rule_scse_in_training_only_and_the_one_switch(monkeypatch):
    """CPU: scSE takes the fast path whenever a gradient is wanted, at any map size; cSE and
    sSE (which save one map either way) and inference run the eager formulas; SCSE_SEG_FUSED=0
    turns the fast path off, and the result is the eager one."""
    x = torch.randn(2, 4, 3, 3, requires_grad=True)  # a tiny map: no size threshold
    for fusion in ("max", "add"):
        assert _path(ConcurrentSE(4, 2, fusion=fusion), x) == "fast"
    assert _path(ChannelSE(4, 2), x) == "eager" and _path(SpatialSE(4, 2), x) == "eager"
    m = ConcurrentSE(4, 2)
    with torch.no_grad():
        assert m(x).grad_fn is None
    assert _path(m, x.detach()) == "fast"  # the parameters still want gradients
    y_fast = m(x)
    monkeypatch.setenv("SCSE_SEG_FUSED", "0")
    assert _path(m, x) == "eager"
    assert torch.allclose(m(x), y_fast, atol=1e-6)


def test_autocast_bf16_on_cpu():
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


def test_deterministic_mode_bit_exact():
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


def test_other_modes_are_refused():
    x = torch.randn(1, 4, 3, 3)
    with pytest.raises(ValueError, match="the CPU fast path serves scse_max, scse_add, not 'cse'"):
        cpu_se.se_function(x, "cse", *[None] * 6)
