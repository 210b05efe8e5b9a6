"""Fused Triton SE kernels (scse_seg.kernels, through their custom ops) against the blocks' eager
formulas.

On CPU the kernels run on the Triton interpreter, which must be switched on (TRITON_INTERPRET=1)
before Triton decorates them. Other tests in the same pytest process may already have imported
Triton, so every interpreter check runs in ONE child process (this file run as a script with
``--worker``), which prints one JSON line per case; the pytest functions below assert on those
lines, so each case still passes or fails on its own.

Exactness checks run in float64 (the interpreter supports it; kernels accumulate in fp64 for
fp64 maps) and require forward and every gradient (x and all parameters) within 1e-6 of eager.
Odd sizes (N=3, C=5, 7x9) exercise masking; a 70-channel 20x30 map exercises several spatial and
channel tiles and the split channel loop; maps with ``x == 0`` exercise the scSE-max tie rule.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MODES = ["cse", "sse", "scse_max", "scse_add"]
TOL = 1e-6


# ------------------------------------------------------------------------------------------
# worker (runs in the child process, TRITON_INTERPRET=1)
# ------------------------------------------------------------------------------------------


def _block(mode: str, channels: int, dim: int):
    from scse_seg.kernels.selfcheck import reference_block  # fused=False: the eager formulas

    return reference_block(mode, channels, dim, torch.float32)


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        return x.contiguous(memory_format=fmt)
    if layout == "transposed":  # spatial dims not flattenable to one stride: copy fallback
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    return x.contiguous()


def _compare(mode, shape, layout, dy_layout=None, dtype=torch.float64, force_split=False):
    """Max abs difference (fused - eager) over output and all gradients, and layout checks."""
    from scse_seg import kernels
    from scse_seg.kernels import triton_se

    torch.manual_seed(0)
    triton_se.MIN_PROGRAMS = 10 ** 6 if force_split else None
    m = _block(mode, shape[1], len(shape) - 2).to(dtype)
    with torch.no_grad():  # non-trivial biases, gates away from 0/1
        for p in m.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(shape, dtype=dtype)
    x[torch.rand(shape) < 0.2] = 0  # ReLU-like zeros: ties of the max fusion
    x = _layout(x, layout)
    dy = _layout(torch.randn(shape, dtype=dtype), dy_layout or layout)
    xf, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    params = list(m.parameters())
    yf = kernels.fused_se(xf, m, mode)
    gf = torch.autograd.grad(yf, [xf, *params], dy)
    ye = m(xe)  # fused=False: the block's eager formulas
    ge = torch.autograd.grad(ye, [xe, *params], dy)
    err = max([(yf - ye).abs().max().item()] + [(a - b).abs().max().item() for a, b in zip(gf, ge)])
    return {"err": err, "same_strides": yf.stride() == x.stride() and gf[0].stride() == x.stride(),
            "dtype_ok": yf.dtype == dtype and gf[0].dtype == dtype}


def _compare_low_precision(dtype, mode="scse_max"):
    """bf16/fp16 map, fp32 parameters, under autocast: against an fp64 eager reference fed the
    same rounded inputs; the error must stay at the level of the output dtype's rounding."""
    from scse_seg import kernels

    torch.manual_seed(1)
    m = _block(mode, 12, 2)
    x = torch.randn(2, 12, 10, 12).relu().to(dtype).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(x.shape).to(dtype)
    xf = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yf = kernels.fused_se(xf, m, mode)
    gf = torch.autograd.grad(yf, [xf, *m.parameters()], dy)
    md = _block(mode, 12, 2).double()
    md.load_state_dict(m.state_dict())
    xd = x.double().requires_grad_()
    yd = md(xd)
    gd = torch.autograd.grad(yd, [xd, *md.parameters()], dy.double())

    def rel(a, b):
        return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()

    return {"err": max([rel(yf, yd)] + [rel(a, b) for a, b in zip(gf, gd)]),
            "dtype_ok": yf.dtype == dtype and gf[0].dtype == dtype
            and all(g.dtype == torch.float32 for g in gf[1:])}


NAMES = ("fc1_w", "fc1_b", "fc2_w", "fc2_b", "sse_w", "sse_b")


def _params(c, hidden, dtype=torch.float64, bias=True):
    g = torch.Generator().manual_seed(2)

    def r(*s):
        return (torch.randn(*s, generator=g, dtype=dtype) * 0.5).requires_grad_()

    return [r(hidden, c), r(hidden) if bias else None, r(c, hidden), r(c) if bias else None,
            r(1, c, 1, 1), r(1) if bias else None]


def _scse(x, p, fusion):
    from scse_seg import kernels

    return kernels.fused_se_function(x, f"scse_{fusion}", **dict(zip(NAMES, p)))


def _compare_compiled(fusion: str, backend: str):
    """torch.compile(fullgraph) of a function using the custom op vs the same function eager."""
    dtype = torch.float64 if backend == "aot_eager" else torch.float32
    x = torch.randn(2, 6, 5, 7, dtype=dtype).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    p = _params(6, 3, dtype)

    def f(x, *p):
        return (_scse(x, p, fusion) * 2).sin()

    y1 = f(x, *p)
    g1 = torch.autograd.grad(y1.sum(), [x, *p])
    fc = torch.compile(f, backend=backend, fullgraph=True)
    y2 = fc(x, *p)
    g2 = torch.autograd.grad(y2.sum(), [x, *p])
    return {"err": max([(y1 - y2).abs().max().item()]
                       + [(a - b).abs().max().item() for a, b in zip(g1, g2)])}


def _compare_functional_no_bias():
    """Fused scSE (add) without biases vs the formula written in torch."""
    import torch.nn.functional as F

    x = torch.randn(3, 4, 6, 5, dtype=torch.float64, requires_grad=True)
    p = _params(4, 2, bias=False)
    yf = _scse(x, p, "add")
    gc = torch.sigmoid(F.linear(torch.relu(F.linear(x.mean((2, 3)), p[0])), p[2]))[..., None, None]
    gs = torch.sigmoid(F.conv2d(x, p[4]))
    ye = x * (gc + gs)
    used = [x, p[0], p[2], p[4]]
    dy = torch.randn_like(x)
    gf, ge = torch.autograd.grad(yf, used, dy), torch.autograd.grad(ye, used, dy)
    return {"err": max([(yf - ye).abs().max().item()]
                       + [(a - b).abs().max().item() for a, b in zip(gf, ge)])}


def _opcheck():
    """torch.library.opcheck: schema, fake (meta) impl, autograd registration, AOT dispatch."""
    from scse_seg.kernels import ops

    x = torch.randn(2, 5, 4, 3, dtype=torch.float64, requires_grad=True)
    p = _params(5, 2)
    bad = []
    for mode in MODES:
        cse = p[:4] if mode != "sse" else [None] * 4
        sse = p[4:] if mode != "cse" else [None] * 2
        res = torch.library.opcheck(ops.se_forward, (x, *cse, *sse, mode))
        bad += [f"{mode}:{k}" for k, v in res.items() if v != "SUCCESS"]
    return {"failed": bad}


def _self_check(kernel: str):
    """A block routed to the Triton kernels (CPU tensors, interpreter) with a correct, a wrong
    (output off by 1%) or a raising kernel injected: the self-check's verdict, its warnings, and
    the block's output against its eager formulas."""
    import warnings

    from scse_seg import kernels
    from scse_seg.blocks import ConcurrentSE
    from scse_seg.kernels import ops, selfcheck

    def wrong(x, mode, **p):
        return ops.se_function(x, mode, **p) * 1.01

    def raising(x, mode, **p):
        raise RuntimeError("triton: out of resources")

    selfcheck.reset()
    kernels.TRITON_ON_CPU = True
    kernels.TRITON_FN = {"good": None, "wrong": wrong, "raising": raising}[kernel]
    try:
        torch.manual_seed(0)
        m = ConcurrentSE(8, 2, fusion="max")
        ref = ConcurrentSE(8, 2, fusion="max", fused=False)
        ref.load_state_dict(m.state_dict())
        x = torch.randn(2, 8, 6, 6)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t = time.perf_counter()
            y1 = m(x)
            first = time.perf_counter() - t
            y2 = m(x)
        texts = [str(w.message) for w in caught if "self-check" in str(w.message)]
        err = max((y1 - ref(x)).abs().max().item(), (y2 - ref(x)).abs().max().item())
        return {"known": selfcheck.known(x, "scse_max"), "warnings": texts, "err": err,
                "first_call_s": first}
    finally:
        kernels.TRITON_ON_CPU, kernels.TRITON_FN = False, None
        selfcheck.reset()


def worker_cases():
    """(case id, thunk) for every check run in the interpreter process."""
    cases = []
    for mode in MODES:
        for dim, shape in ((2, (3, 5, 7, 9)), (3, (2, 5, 3, 4, 5))):
            for layout in ("contiguous", "channels_last"):
                cases.append((f"exact-{mode}-{dim}d-{layout}",
                              lambda m=mode, s=shape, lay=layout: _compare(m, s, lay)))
    for mode in MODES:  # several tiles in p and c; channel loop split over programs
        for layout in ("contiguous", "channels_last"):
            cases.append((f"tiles-{mode}-{layout}", lambda m=mode, lay=layout: _compare(
                m, (2, 70, 20, 30), lay, force_split=True)))
    cases += [
        ("mixed-dy-layout-scse_max", lambda: _compare("scse_max", (3, 5, 7, 9), "channels_last",
                                                      dy_layout="contiguous")),
        ("fallback-transposed-scse_add-3d", lambda: _compare("scse_add", (2, 5, 3, 4, 5),
                                                             "transposed")),
        ("fp32-scse_max", lambda: _compare("scse_max", (3, 5, 7, 9), "contiguous",
                                           dtype=torch.float32)),
        ("autocast-bf16", lambda: _compare_low_precision(torch.bfloat16)),
        ("autocast-fp16", lambda: _compare_low_precision(torch.float16)),
        ("functional-no-bias", _compare_functional_no_bias),
        ("compile-aot_eager-max", lambda: _compare_compiled("max", "aot_eager")),
        ("compile-aot_eager-add", lambda: _compare_compiled("add", "aot_eager")),
        ("opcheck", _opcheck),
        ("selfcheck-good", lambda: _self_check("good")),
        ("selfcheck-wrong", lambda: _self_check("wrong")),
        ("selfcheck-raising", lambda: _self_check("raising")),
    ]
    if os.environ.get("SCSE_TEST_INDUCTOR") == "1":
        cases.append(("compile-inductor-max", lambda: _compare_compiled("max", "inductor")))
    return cases


def _worker() -> None:
    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    for name, fn in worker_cases():
        t = time.perf_counter()
        try:
            res = fn()
        except Exception as e:  # report, keep going: one broken case must not hide the others
            res = {"error": f"{type(e).__name__}: {e}"}
        res["seconds"] = round(time.perf_counter() - t, 3)
        print(json.dumps({"case": name, **res}), flush=True)


# ------------------------------------------------------------------------------------------
# pytest side
# ------------------------------------------------------------------------------------------


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


@pytest.fixture(scope="module")
def interpreter_results():
    if not _triton_importable():
        pytest.skip("triton is not importable")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__, "--worker"], env=env, capture_output=True,
                          text=True, timeout=600, cwd=str(ROOT))
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            results[rec.pop("case")] = rec
    if not results:
        pytest.fail(f"interpreter worker produced no results (rc={proc.returncode}):\n"
                    f"{proc.stderr[-3000:]}")
    results["_stderr"] = proc.stderr[-3000:]
    return results


def _result(results, case):
    if case not in results:
        pytest.fail(f"worker did not report {case!r} (crashed?):\n{results['_stderr']}")
    res = results[case]
    assert "error" not in res, res["error"]
    return res


CASE_IDS = [name for name, _ in worker_cases()]


@pytest.mark.parametrize("case", [c for c in CASE_IDS
                                  if c.startswith(("exact", "tiles", "mixed", "fallback"))])
def test_fused_matches_eager_float64(interpreter_results, case):
    res = _result(interpreter_results, case)
    assert res["err"] < TOL, res
    assert res["same_strides"], "output / grad_x must keep the input's memory format"
    assert res["dtype_ok"]


def test_fused_fp32(interpreter_results):
    res = _result(interpreter_results, "fp32-scse_max")
    assert res["err"] < 1e-5, res


@pytest.mark.parametrize("case,tol", [("autocast-bf16", 2e-2), ("autocast-fp16", 3e-3)])
def test_fused_low_precision_under_autocast(interpreter_results, case, tol):
    res = _result(interpreter_results, case)
    assert res["err"] < tol, res
    assert res["dtype_ok"], "out/grad_x keep the map dtype, parameter grads stay fp32"


def test_functional_api_without_biases(interpreter_results):
    assert _result(interpreter_results, "functional-no-bias")["err"] < TOL


@pytest.mark.parametrize("case", ["compile-aot_eager-max", "compile-aot_eager-add"])
def test_torch_compile_fullgraph(interpreter_results, case):
    assert _result(interpreter_results, case)["err"] < TOL


def test_custom_op_opcheck(interpreter_results):
    assert _result(interpreter_results, "opcheck")["failed"] == []


def test_the_one_switch_turns_the_kernels_off(monkeypatch):
    """SCSE_SEG_FUSED=0 wins even where the kernels could run: available() is False and no
    mode of any block is routed to them (nor to the CPU fast path)."""
    from scse_seg import kernels
    from scse_seg.kernels.gates import MODES, module_params

    monkeypatch.setattr(kernels, "_TRITON", True)  # as if Triton and a device were there
    monkeypatch.setattr(kernels, "TRITON_ON_CPU", True)
    assert kernels.available()
    monkeypatch.setenv("SCSE_SEG_FUSED", "0")
    assert not kernels.available()
    x = torch.randn(1, 4, 5, 5, requires_grad=True)
    for mode in MODES:
        assert kernels.se(x, mode, module_params(_block(mode, 4, 2), mode)) is None


def test_blocks_never_need_triton_on_cpu():
    """The blocks only route CUDA tensors to the kernels, so CPU training never imports Triton."""
    import subprocess

    code = ("import sys, torch; from scse_seg.blocks import ConcurrentSE; x = torch.randn(1, 4, 5, 5,"
            " requires_grad=True); ConcurrentSE(4)(x).sum().backward(); print('triton' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT),
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True).stdout
    assert out.strip() == "False"


def test_self_check_trusts_a_correct_kernel(interpreter_results):
    res = _result(interpreter_results, "selfcheck-good")
    assert res["known"] is True and res["warnings"] == [] and res["err"] < 1e-5, res


@pytest.mark.parametrize("case,problem", [("selfcheck-wrong", "max relative error 1.0e-02 > 1e-04"),
                                          ("selfcheck-raising", "raised RuntimeError: triton")])
def test_self_check_falls_back_and_warns_once(interpreter_results, case, problem):
    """A wrong or failing kernel: one warning naming the measured error, then the block's output
    comes from the PyTorch path (equal to the eager formulas), for every later call too."""
    res = _result(interpreter_results, case)
    assert res["known"] is False
    assert len(res["warnings"]) == 1, res["warnings"]
    assert problem in res["warnings"][0], res["warnings"][0]
    assert "using the eager formulas for the rest of this process" in res["warnings"][0]
    assert res["err"] < 1e-5, "fell back to the eager formulas"


# ------------------------------------------------------------------------------------------
# real GPU
# ------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_block_uses_fused_and_matches_eager(mode, dim, dtype, channels_last):
    pytest.importorskip("triton")
    from scse_seg import kernels

    if not kernels.available() or kernels.interpreting():
        pytest.skip("compiled Triton kernels not available")
    torch.manual_seed(0)
    m = _block(mode, 48, dim).cuda()
    m.fused = True  # the block (not its ConcurrentSE sub-blocks) takes the fused path
    shape = (3, 48, 33, 47) if dim == 2 else (2, 48, 9, 17, 13)
    x = torch.randn(shape, device="cuda").relu().to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if dim == 2
                         else torch.channels_last_3d)
    dy = torch.randn_like(x)
    from scse_seg.kernels.selfcheck import max_route_ambiguous

    ambiguous = max_route_ambiguous(copy.deepcopy(m).double(), x.double())
    if ambiguous is not None:  # max fusion's near-ties: the routing, not the kernel, decides
        dy = dy.masked_fill(ambiguous, 0)
    xf, xe = x.clone().requires_grad_(), x.double().requires_grad_()
    yf = m(xf)  # CUDA + fused=True: the fused path
    gf = torch.autograd.grad(yf, [xf, *m.parameters()], dy)
    md = _block(mode, 48, dim).cuda().double()
    md.load_state_dict(m.state_dict())
    for mod in md.modules():
        if hasattr(mod, "fused"):
            mod.fused = False
    ye = md(xe)
    ge = torch.autograd.grad(ye, [xe, *md.parameters()], dy.double())
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for a, b in zip([yf, *gf], [ye, *ge]):
        assert ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() < tol
    assert yf.stride() == x.stride()
    from scse_seg.kernels import selfcheck

    assert selfcheck.known(x, mode) is True, "the kernels passed their self-check and ran"


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()

