"""Smoke test of the benchmarks (bench/): the whole command on CPU at a tiny size, one timed call
per repetition. Checks that the tables have every row and column, not any timing."""
from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch
from helpers import ROOT

sys.path.insert(0, str(ROOT))

from bench import bench_blocks, bench_models, run  # noqa: E402
from bench.common import Workload  # noqa: E402

TINY = ["--device", "cpu", "--size", "32", "--batch", "2", "--width", "16", "--classes", "3",
        "--encoder", "efficientnet-b0", "--warmup", "0", "--iters", "1", "--block-warmup", "0",
        "--block-iters", "1", "--copy-mib", "8", "--threads", "1"]  # 1 thread: robust on busy CI


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    try:
        result = run.main(["all", *TINY, "--no-fused", "--out", str(out)], log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    return out, result


def test_models_table_has_every_row_and_column(report):
    out, result = report
    rows = _csv(out / "models.csv")
    # every attention row as 'torch' (eager formulas) and 'fast' (the blocks' default path)
    assert len(rows) == len(result["models"]) == 4 * (1 + 3 * 2) + 2
    assert {r["impl"] for r in rows if r["attention"] != "none" and "smp." not in r["arch"]} == {
        "torch", "fast"}
    got = {(r["arch"].split()[0], r["attention"]) for r in rows}
    assert got == {(a, att) for a in ("unet", "densenet", "sdnet", "smp_unet")
                   for att in bench_models.ATTENTIONS} | {("smp.Unet(efficientnet-b0)", "none"),
                                                          ("smp.Unet(efficientnet-b0)", "scse")}
    for r in result["models"]:
        for key, _, _ in bench_models.COLUMNS:
            assert key in r, key
        assert r["ms_rep1"] > 0 and r["ms_rep2"] > 0 and r["slices_per_s"] > 0
        assert r["overhead_pct"] is not None
        if r["attention"] == "none":
            assert r["overhead_pct"] == 0
        assert r["saved_MB"] > 0
    saved = {(r["arch"], r["attention"], r["impl"]): r["saved_MB"] for r in result["models"]}
    for arch in ("unet", "densenet", "sdnet"):  # byte counts, exact: the fast path keeps less
        assert saved[(arch, "scse", "fast")] < saved[(arch, "scse", "torch")]
    text = (out / "report.md").read_text()
    assert "## Training step" in text and "## SE blocks" in text
    for _, header, _ in bench_models.COLUMNS + bench_blocks.COLUMNS:
        assert f" {header} |" in text, header


def test_blocks_table_covers_every_shape_and_variant(report):
    out, result = report
    rows = _csv(out / "blocks.csv")
    shapes = bench_blocks.attention_shapes(bench_blocks.BLOCK_ARCHS, Workload(size=32, width=16))
    # unet: 16..256 channels over 5 levels; densenet/sdnet: 16 channels at every level
    assert {s["chw"] for s in shapes} == {(16 * 2 ** i, 32 >> i, 32 >> i) for i in range(5)} | {
        (16, 32 >> i, 32 >> i) for i in range(5)}
    fast_rows = len(bench_blocks.FAST_MODES)  # scSE also as impl 'fast'
    assert len(rows) == len(shapes) * (len(bench_blocks.VARIANTS) + fast_rows)
    for r in result["blocks"]:
        has_floor = r["variant"] != "none"
        assert (r["fb_ratio"] is not None) == has_floor
        assert r["fwd_us"] > 0 and r["fb_us"] > 0
        if r["impl"] == "fast":  # exact byte counts: x is the only map-sized tensor saved
            assert r["saved_maps"] == 1, r
        if r["variant"] == "scse_max" and r["impl"] == "torch":
            assert r["saved_maps"] >= 3, r


def test_settings_grid_and_bad_input():
    args = run.resolve(run.parser().parse_args(
        ["models", *TINY[:-2], "--dtype", "fp32", "bf16", "--layout", "nchw", "channels_last",
         "--compile", "both"]))
    assert len(run.settings(args)) == 8
    with pytest.raises(SystemExit):
        run.resolve(run.parser().parse_args(["models", "--device", "cpu", "--size", "48"]))


def test_fused_check_under_triton_interpreter(tmp_path):
    """CPU --fused: the block table compares the kernels (Triton interpreter) with the eager
    formulas; a child process, since the interpreter must be on before Triton is imported."""
    pytest.importorskip("triton")
    cmd = [sys.executable, str(ROOT / "bench" / "run.py"), "blocks", *TINY, "--fused",
           "--block-archs", "sdnet", "--variants", "scse_max", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = _csv(tmp_path / "blocks.csv")
    checked = [r for r in rows if r["impl"] == "torch"]
    assert len(rows) == 10 and len(checked) == 5
    assert all(float(r["fused_rel_err"]) < 1e-5 for r in checked)


def test_selfcheck_cost_bench_under_triton_interpreter(tmp_path):
    """bench/bench_selfcheck.py (the self-check's cost on a GPU) runs end to end on CPU under
    the Triton interpreter: one row per combination, every kernel trusted with a small error."""
    pytest.importorskip("triton")
    cmd = [sys.executable, str(ROOT / "bench" / "bench_selfcheck.py"), "--device", "cpu",
           "--modes", "scse_max", "sse", "--dims", "2", "--dtypes", "fp32", "--layouts", "nchw",
           "channels_last", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = _csv(tmp_path / "selfcheck.csv")
    assert [(r["mode"], r["layout"]) for r in rows] == [
        ("scse_max", "nchw"), ("sse", "nchw"), ("scse_max", "channels_last"),
        ("sse", "channels_last")]
    assert all(r["trusted"] == "True" and float(r["err"]) < 1e-5 for r in rows)
    assert "| mode | dims |" in (tmp_path / "report.md").read_text()


# --- paired step overhead (bench/bench_overhead.py) ------------------------------------------


def test_median_ci_uses_the_binomial_order_statistics():
    from bench.bench_overhead import median_ci

    xs = list(range(20, 0, -1))  # 1..20, unsorted
    # n = 20: P(Bin(20, 1/2) <= 5) = 0.0207 <= 0.025 < P(<= 6) = 0.0577 -> (x_(6), x_(15))
    assert median_ci(xs) == (6, 15)
    # n = 6: P(Bin <= 0) = 1/64 <= 0.025 < P(<= 1) = 7/64 -> (min, max)
    assert median_ci([3, 1, 2, 6, 5, 4]) == (1, 6)
    with pytest.raises(ValueError):  # n = 5: P(Bin <= 0) = 1/32 > 0.025, no interval
        median_ci([1, 2, 3, 4, 5])


def test_rotated_rounds_give_every_case_every_position():
    from bench.bench_overhead import paired_rounds, rotations

    orders = rotations(3, 6)
    assert orders[:3] == [[0, 1, 2], [1, 2, 0], [2, 0, 1]]
    for case in range(3):
        assert sorted(o.index(case) for o in orders) == [0, 0, 1, 1, 2, 2]
    calls = []
    times = paired_rounds([lambda: calls.append("a"), lambda: calls.append("b")], 2,
                          lambda fn: (fn(), float(len(calls)))[1])
    assert calls == ["a", "b", "b", "a"]  # round 1 a, b; round 2 b, a
    assert times == [[1.0, 2.0], [4.0, 3.0]]


def test_overhead_summary_is_the_median_of_per_round_ratios():
    from bench.bench_overhead import summarise

    # none 10 ms every round; the variant's ratios 1.1 1.2 .9 1.05 1.3 1.0 1.15
    variant = [11, 12, 9, 10.5, 13, 10, 11.5]
    base, row = summarise([[10.0, v] for v in variant])
    assert base == {"rounds": 7, "ms": 10.0}
    assert row["ms"] == 11
    assert row["overhead_pct"] == pytest.approx(10.0)  # sorted ratios' 4th: 1.1
    assert row["ci_lo_pct"] == pytest.approx(-10.0) and row["ci_hi_pct"] == pytest.approx(30.0)
    assert row["slower_rounds"] == "5 of 7"
    # a drift that slows both steps of a round alike leaves the ratios, and so the result, alone
    drift = summarise([[10.0 * f, v * f] for v, f in zip(variant, (1, 3, 1, 2, 1, 5, 1))])[1]
    assert drift["overhead_pct"] == pytest.approx(10.0)


def test_overhead_command_writes_a_row_per_variant(tmp_path):
    threads = torch.get_num_threads()
    try:
        result = run.main(["overhead", "--device", "cpu", "--archs", "sdnet", "--rounds", "6",
                           "--warmup", "1", "--size", "32", "--width", "8", "--classes", "3",
                           "--encoder", "efficientnet-b0", "--threads", "1", "--eager",
                           "--scse-setting", "reduction=4,fusion=add",
                           "--out", str(tmp_path)], log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    rows = _csv(tmp_path / "overhead.csv")
    assert [(r["arch"].split()[0], r["attention"], r["impl"]) for r in rows] == [
        ("sdnet", "none", "torch"), ("sdnet", "scse", "fast"),
        ("sdnet", "scse (reduction=4, fusion=add)", "fast"), ("sdnet", "scse", "torch"),
        ("smp.Unet(efficientnet-b0)", "none", "smp"), ("smp.Unet(efficientnet-b0)", "scse", "smp")]
    for r in result["rows"]:
        assert r["rounds"] == 6 and r["ms"] > 0
        if r["attention"] != "none":
            assert r["ci_lo_pct"] <= r["overhead_pct"] <= r["ci_hi_pct"]
    assert "median of rounds" in (tmp_path / "overhead.md").read_text()


def test_chunk_bench_times_every_chunk_size_beside_eager_and_smp(tmp_path):
    from bench import bench_chunks

    threads = torch.get_num_threads()
    try:
        result = bench_chunks.main(["--shape", "2,16,8,8", "--layout", "nchw", "channels_last",
                                    "--chunks", "0", "64", "--rounds", "1", "--iters", "1",
                                    "--threads", "1", "--out", str(tmp_path)], log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    assert [r["elements"] for r in result["cache"]] == list(bench_chunks.SIZES)
    got = {(r["layout"], r["mode"], r["variant"]) for r in _csv(tmp_path / "chunks.csv")}
    expected = {(lay, m, v) for lay in ("nchw", "channels_last") for m in bench_chunks.MODES
                for v in ("chunk 0", "chunk 64", "eager")}
    assert got == expected | {(lay, "scse_add", "smp SCSEModule") for lay in ("nchw", "channels_last")}
    assert all(r["vs_unchunked"] == 1 for r in result["chunks"] if r["variant"] == "chunk 0")
    from scse_seg.kernels import cpu_se

    assert cpu_se.CHUNK_ELEMENTS_PER_THREAD == 131072  # the chunk size is put back


def test_scse_setting_reaches_the_built_network():
    from bench.bench_overhead import parse_setting
    from scse_seg.blocks import ConcurrentSE

    opts = parse_setting("reduction=4,fusion=add")
    assert opts == (("reduction", 4), ("fusion", "add"))
    with pytest.raises(SystemExit):
        parse_setting("reduction")
    work = Workload(batch=1, size=32, classes=3, width=8)
    model = bench_models.build_model(bench_models.ModelCase("sdnet", "scse", "fast", opts), work)
    blocks = [m for m in model.modules() if isinstance(m, ConcurrentSE)]
    assert blocks and all(b.fusion == "add" for b in blocks)
    assert all(b.cse.excite.fc1.out_features == 8 // 4 for b in blocks)  # width 8, reduction 4
