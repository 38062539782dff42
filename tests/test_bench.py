"""The benchmark suite runs end to end on a tiny CPU scenario and writes what it promises.

Checks the engine (rope_backends.benchmark), the command line (python -m rope_backends bench and
its alias python -m bench), the report writer (bench/report.py) and run_short(): the JSON schema,
the bit_exact column (True for the eager backend and the reference, computed for every peer, and
False when an implementation is wrong), the overhead fields, graceful degradation without
matplotlib, and that results written before the engine was split still render.
Never checks timings: only that they are positive numbers.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rope_backends.benchmark import baselines, engine, implementations, report, rope_index, scenarios, targets, timing
from rope_backends.benchmark.implementations import NPU_PATH
from rope_backends.benchmark.scenarios import Impl

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(scale="tiny", quick=True, skip=("torch.compile",), progress=False, command="pytest")

_EMPTY_DOC = {"device": {"type": "cpu", "name": "cpu"}, "copy_bandwidth": {"gbps": 1.0},
              "versions": {"torch": "-", "triton": "-"}, "default_backend": "eager", "rows": []}
ROW_KEYS = {
    "group": str, "scenario": str, "op": str, "shape": str, "dtype": str, "layout": str, "tokens": int,
    "implementation": str, "kind": str, "timing": str, "us": float, "bytes": int, "buffers": int,
}
DOC_KEYS = ("schema", "date", "device", "device_label", "versions", "command", "copy_bandwidth", "byte_counting",
            "timing", "bit_exact_rule", "rows", "skipped", "summary", "default_backend", "groups")


def _report_cli():
    """bench/report.py, the command line of the README results section (a checkout module)."""
    sys.path.insert(0, str(ROOT))
    try:
        from bench import report as report_cli
    finally:
        sys.path.remove(str(ROOT))
    return report_cli


@pytest.fixture(scope="module")
def doc():
    return engine.run_device("cpu", ["diffusion", "qk", "llm", "mrope", "backward", "dispatch"], **TINY)


def test_document_schema(doc):
    for key in DOC_KEYS:
        assert key in doc, key
    assert doc["schema"] == report.SCHEMA
    assert doc["device"]["type"] == "cpu" and doc["device"]["cores"] >= 1
    assert doc["versions"]["torch"] == torch.__version__
    assert doc["copy_bandwidth"]["gbps"] > 0 and doc["copy_bandwidth"]["bytes_per_copy"] > 0
    assert doc["default_backend"] == "eager"
    assert "bytes" in doc["byte_counting"] and "copy" in doc["byte_counting"]
    json.dumps(doc)  # serialisable as it is


def test_rows_schema_and_values(doc):
    rows = doc["rows"]
    assert {r["group"] for r in rows} == {"diffusion", "qk", "llm", "mrope", "backward", "dispatch"}
    for r in rows:
        for key, kind in ROW_KEYS.items():
            assert isinstance(r[key], kind), (key, r)
        assert r["us"] > 0 and math.isfinite(r["us"])
        assert r["gbps"] == pytest.approx(r["bytes"] / r["us"] / 1e3)
        assert r["pct_copy"] == pytest.approx(100 * r["gbps"] / doc["copy_bandwidth"]["gbps"])
        if r["implementation"] in (baselines.SAME_BYTES_COPY, baselines.TORCH_OP, baselines.TORCH_AUTOGRAD_OP):
            assert r["bit_exact"] is None and r["kind"] == "baseline", r  # computes no rope
        else:
            assert isinstance(r["bit_exact"], bool), r
        assert r["timing"] == "torch_timer"
        assert r["kind"] in ("backend", "peer", "baseline")


def test_implementations_and_bit_exact_column(doc):
    rows = doc["rows"]
    by_impl = {}
    for r in rows:
        by_impl.setdefault(r["implementation"], []).append(r)
    # every case has the eager backend, the reference and the contiguous peer
    assert {"eager", "eager-strided", NPU_PATH} <= set(by_impl)
    for name in ("eager", "eager-strided", NPU_PATH):
        assert all(r["bit_exact"] is True for r in by_impl[name]), name
    assert "torch.compile" not in by_impl  # skipped on request
    # the simulated NPU serves CPU only when named: a test vehicle, never benchmarked
    assert "npu" not in by_impl
    skipped = {s.get("implementation") for s in doc["skipped"]}
    assert "npu" in skipped and "triton" in skipped
    # absent optional peers are reported, not silently dropped
    for peer in ("liger-kernel", "flashinfer"):
        if peer not in by_impl:
            assert peer in skipped


def test_groups_cover_their_cases(doc):
    rows = doc["rows"]
    llm_ops = {(r["op"], r["tokens"]) for r in rows if r["group"] == "llm"}
    assert llm_ops == {(op, t) for op in ("apply_qk", "apply_cached") for t in scenarios.LLM_TOKENS["tiny"]}
    mrope = {r["scenario"] for r in rows if r["group"] == "mrope"}
    assert len(mrope) == 4 and "plain" in mrope
    assert {r["op"] for r in rows if r["group"] == "backward"} == {"forward", "backward"}
    # the model-step rows: L layers' calls, one backward through all of them, checked like the rest
    layers = scenarios.BACKWARD_LAYERS["tiny"]
    stepped = [r for r in rows if r["group"] == "backward" and r["shape"].startswith(f"{layers} x (")]
    assert {(r["op"], r["implementation"]) for r in stepped} == {
        (op, impl) for op in ("forward", "backward") for impl in ("eager", baselines.TORCH_AUTOGRAD_OP)}
    assert all(r["bit_exact"] for r in stepped if r["implementation"] == "eager")
    single = {r["shape"]: r["bytes"] for r in rows if r["group"] == "backward" and " x (" not in r["shape"]}
    assert all(r["bytes"] == layers * single[r["shape"].split(" x ", 1)[1]] for r in stepped)
    assert {r["layout"] for r in rows if r["group"] == "diffusion"} == {"interleaved", "neox"}  # the largest: both
    assert {(r["op"], r["layout"]) for r in rows if r["group"] == "qk"} == {("apply_qk", "neox")}


def test_same_bytes_copy_baseline(doc):
    """Every diffusion, q+k and LLM case has a copy of as many bytes, and the summary sets each rope
    call against it: a target (97 % of the copy) for the smaller diffusion shapes and apply_cached
    at T >= 4096, informational elsewhere; never judged off the GPU."""
    rows = doc["rows"]
    groups = ("diffusion", "qk", "llm")
    rope = [r for r in rows if r["group"] in groups and r["implementation"] == "eager"]
    copies = {(r["scenario"], r["op"], r["shape"]): r for r in rows if r["implementation"] == baselines.SAME_BYTES_COPY}
    assert rope and {(r["scenario"], r["op"], r["shape"]) for r in rope} == set(copies)
    assert all(c["bytes"] == r["bytes"] for r in rope for c in [copies[(r["scenario"], r["op"], r["shape"])]])
    assert not any(r["implementation"] == baselines.SAME_BYTES_COPY for r in rows if r["group"] not in groups)
    ratios = [s for s in doc["summary"] if "same-bytes copy" in s["target"]]
    assert len(ratios) == len([r for r in rope if r["group"] != "llm" or r["tokens"] >= 4096])
    for s in ratios:
        assert s["limit"] in (None, targets.SAME_BYTES_TARGET) and s["met"] is None and s["value"] > 0
    assert {s["limit"] for s in ratios} == {None, targets.SAME_BYTES_TARGET}


def test_dispatch_overhead_fields(doc):
    public = [r for r in doc["rows"] if r["group"] == "dispatch" and r["implementation"].startswith("rb.")]
    assert {r["implementation"] for r in public} == {"rb.apply", "rb.apply_cached"}
    forward = {r["scenario"]: r for r in doc["rows"] if r["implementation"] == "eager.forward"}
    for r in public:
        base = forward[r["scenario"]]
        assert r["overhead_over_forward_us"] == pytest.approx(r["us"] - base["us"])
        assert r["overhead_over_forward_us_min"] == pytest.approx(r["us_min"] - base["us_min"])
        assert 0 < r["us_min"] <= r["us"]
    assert any("host overhead" in s["target"] for s in doc["summary"])
    assert all(s["met"] is None for s in doc["summary"])  # GPU targets: not judged on a CPU


def test_wrong_peer_is_not_bit_exact():
    """The bit_exact column can say False: a peer that skips the rotation, and one that is off by
    one ulp in a single element, are both caught."""
    case = scenarios.diffusion_cases("tiny", torch.device("cpu"))[0]
    clock = timing.Clock(torch.device("cpu"), quick=True)

    def off_by_one(d):
        def run():
            out = scenarios.ref_apply(d, "interleaved")[0].clone()
            out.view(torch.int16).view(-1)[3] += 1
            return (out,)
        return run

    impls = [Impl("identity", "peer", lambda d: lambda: (d["x"].clone(),)),
             Impl("one-ulp", "peer", off_by_one),
             Impl("stack+flatten", "peer", lambda d: lambda: (implementations.npu_path(d["x"], d["cos"], d["sin"], "interleaved"),))]
    rows, skipped = [], []
    engine.run_case(case, impls, clock, 1.0, engine.Progress(False, 1), rows, skipped)
    assert not skipped
    assert {r["implementation"]: r["bit_exact"] for r in rows} == {"identity": False, "one-ulp": False, "stack+flatten": True}


def test_in_place_peers_are_checked_on_fresh_inputs():
    """Timing an in-place implementation rotates its inputs many times; the next implementation's
    check must still start from the original inputs."""
    case = scenarios.llm_cases("tiny", torch.device("cpu"), graphs=False)[-1]
    assert case.op == "apply_cached"
    impls = implementations.for_case(case, torch.device("cpu"), ["eager"], implementations.Options(quick=True, skip=("torch.compile",)))
    assert [i.mutates for i in impls if i.name in ("eager", "eager-strided", NPU_PATH)] == [True] * 3
    rows, skipped = [], []
    engine.run_case(case, impls, timing.Clock(torch.device("cpu"), quick=True), 1.0, engine.Progress(False, 1), rows, skipped)
    rope = [r for r in rows if r["implementation"] != baselines.SAME_BYTES_COPY]
    assert len(rope) == 3 and all(r["bit_exact"] for r in rope)


def test_gpu_implementations_are_timed_in_alternating_rounds(monkeypatch):
    """On a GPU every implementation of a case is timed once per round, in an order that changes
    who follows whom, and each row is the median over the rounds (not whoever ran after a slow
    or a fast neighbour); one that fails while timed is skipped with its reason, the others keep
    their rows."""
    case = scenarios.diffusion_cases("tiny", torch.device("cpu"))[0]
    order, figures = [], {"a": [5.0, 1.0, 3.0], "b": [2.0, 9.0, 4.0]}

    class FakeClock:
        type, quick, rounds, method = "cuda", False, 3, "do_bench"

        def time(self, fn, rounds=1):
            assert rounds == 3
            name = fn()
            order.append(name)
            if name == "broken":
                raise RuntimeError("launch failed")
            return figures[name][sum(1 for n in order if n == name) - 1]

        def kernels(self, fn):
            fn()
            return 7.0

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)

    def named(name):
        def fn():
            return name
        return fn
    timed = [(Impl(n, "peer", None), named(n), True) for n in ("a", "b", "broken")]
    rows, skipped = [], []
    engine._time_in_rounds(case, timed, FakeClock(), 1.0, engine.Progress(False, 1), rows, skipped, 1)
    assert order == ["a", "b", "broken", "b", "a", "a", "b"]  # as given, reversed, evens/odds; broken dropped
    assert [engine.round_order([1, 2, 3, 4, 5], r) for r in range(4)] == [
        [1, 2, 3, 4, 5], [5, 4, 3, 2, 1], [1, 3, 5, 2, 4], [2, 3, 4, 5, 1]]
    got = {(r["implementation"], r["timing"]): r["us"] for r in rows}
    assert got == {("a", "do_bench"): 3.0, ("b", "do_bench"): 4.0, ("a", "kernels"): 7.0, ("b", "kernels"): 7.0}
    assert [s["implementation"] for s in skipped] == ["broken"] and "launch failed" in skipped[0]["reason"]


def test_gpu_code_paths_with_faked_timers(monkeypatch):
    """The CUDA-only plumbing (graph rows, the capturability pre-check, the empty-launch baseline,
    the GPU targets) on CPU tensors, with Triton's timers and the torch.cuda calls faked (the
    empty kernel runs under the Triton interpreter). Timings are fake; the structure is real."""
    import triton.testing

    calls = {"do_bench": 0, "graph": 0}

    def fake_do_bench(fn, warmup=25, rep=100, return_mode="mean", **kw):
        fn()
        calls["do_bench"] += 1
        return 0.010

    def fake_graph(fn, rep=20, return_mode="mean", **kw):
        fn()
        calls["graph"] += 1
        return 0.004

    def fake_kernels(self, fn, calls=12):
        fn()
        return 9.0

    mode = {"now": 0}
    monkeypatch.setattr(timing.Clock, "kernels", fake_kernels)
    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", fake_graph)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: mode["now"])
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda m: mode.__setitem__("now", m))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(baselines, "_EMPTY", {})

    def syncing(d):
        def run():
            if mode["now"] == "error":
                raise RuntimeError("called a synchronizing CUDA operation")
            return scenarios.ref_qk(d, "neox")
        return run

    clock = timing.Clock(torch.device("cpu"), quick=True)
    clock.type = "cuda"
    resets = []  # how many timings had run at each reset of the persisting L2 lines
    clock._reset_l2 = lambda: resets.append(calls["do_bench"] + calls["graph"])
    case = scenarios.llm_cases("tiny", torch.device("cpu"), graphs=True)[0]
    assert case.op == "apply_qk" and case.graph
    impls = implementations.for_case(case, torch.device("cpu"), ["eager"], implementations.Options(quick=True, skip=("torch.compile",)))
    impls.append(Impl("syncing", "peer", syncing))
    rows, skipped = [], []
    engine.run_case(case, impls, clock, 3000.0, engine.Progress(False, 1), rows, skipped)
    rows += engine.launch_rows(torch.device("cpu"), clock, 3000.0, skipped)
    graph = {r["implementation"] for r in rows if r["timing"] == "cuda_graph"}
    assert graph == {"eager", "eager-strided", NPU_PATH, baselines.SAME_BYTES_COPY, "empty-triton-launch"}
    assert {r["implementation"] for r in rows if r["timing"] == "do_bench"} == graph | {"syncing"}
    # every do_bench row of a case has its device-kernel twin (the empty launch is no case)
    assert {r["implementation"] for r in rows if r["timing"] == "kernels"} == graph - {"empty-triton-launch"} | {"syncing"}
    assert any(s["implementation"] == "syncing" and "not capturable" in s["reason"] for s in skipped)
    assert mode["now"] == 0  # the sync debug mode is restored
    assert calls["graph"] == 5
    assert resets == list(range(calls["do_bench"] + calls["graph"]))  # one right before every timing
    doc = {"rows": rows, "default_backend": "eager", "device": {"type": "cuda"}}
    ratio = [s for s in targets.summarize(doc) if "graph replay / empty launch" in s["target"]]
    assert len(ratio) == 1 and ratio[0]["value"] == pytest.approx(1.0) and ratio[0]["met"] is True


def test_persisting_l2_reset_is_the_drivers_call_or_none(monkeypatch):
    """The clock returns evict_last lines to normal through libcuda's cuCtxResetPersistingL2Cache
    where the first call succeeds; where it fails, or on a device that is no CUDA GPU, there is no
    reset, and the JSON's timing note says the lines were not reset."""
    import contextlib
    import ctypes

    status, seen = [0], []

    def fake_reset():
        seen.append(1)
        return status[0]

    class FakeLibcuda:
        cuCtxResetPersistingL2Cache = staticmethod(fake_reset)

    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibcuda())
    monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
    reset = timing._load_reset(torch.device("cuda", 0))
    assert reset is not None and len(seen) == 1  # tried once when loaded
    reset()
    assert len(seen) == 2
    status[0] = 999
    with pytest.raises(RuntimeError, match="cuCtxResetPersistingL2Cache.*999"):
        reset()
    assert timing._load_reset(torch.device("cuda", 0)) is None
    assert timing._load_reset(torch.device("cpu")) is None
    clock = timing.Clock(torch.device("cpu"), quick=True)
    assert not clock.resets_persisting_l2 and engine._persisting_l2_note(clock) == ""
    clock.type = "cuda"
    assert "NOT reset" in engine._persisting_l2_note(clock)
    clock._reset_l2 = reset
    assert "returned to normal" in engine._persisting_l2_note(clock)


def test_a_call_without_kernels_is_listed_not_dropped(monkeypatch):
    import triton.testing

    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: (fn(), 0.010)[1])
    monkeypatch.setattr(timing.Clock, "kernels", lambda self, fn, calls=12: float("nan"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    clock = timing.Clock(torch.device("cpu"), quick=True)
    clock.type = "cuda"
    case = scenarios.diffusion_cases("tiny", torch.device("cpu"))[0]
    impls = [i for i in implementations.for_case(case, torch.device("cpu"), ["eager"], implementations.Options(quick=True))
             if i.name == "eager"]
    rows, skipped = [], []
    engine.run_case(case, impls, clock, 3000.0, engine.Progress(False, 1), rows, skipped)
    assert [r["timing"] for r in rows] == ["do_bench"]
    assert [s["timing"] for s in skipped] == ["kernels"] and "no kernel" in skipped[0]["reason"]


class _Event:
    """What timing._per_call_kernel_us reads of a torch.profiler event."""

    def __init__(self, name, start, dur):
        self.name, self.device_time = name, dur
        self.device_type = torch.autograd.DeviceType.CUDA
        self.time_range = type("Range", (), {"start": start, "end": start + dur})()


def test_kernel_time_is_summed_between_flushes():
    flush = "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<int>, ...>"
    spin = "at::cuda::(anonymous namespace)::spin_kernel(long)"
    events = [_Event(flush, 0, 60), _Event(spin, 60, 1), _Event("rope_kernel", 61, 30), _Event("copy", 92, 5),  # 35
              _Event(flush, 100, 60), _Event("rope_kernel", 161, 31),                       # 31
              _Event(flush, 200, 60), _Event("FillFunctor<float>", 261, 2), _Event("rope_kernel", 264, 40)]  # 42
    cpu = _Event("cpu op", 0, 1000)
    cpu.device_type = torch.autograd.DeviceType.CPU
    assert timing._per_call_kernel_us(list(reversed(events)) + [cpu]) == 35
    assert math.isnan(timing._per_call_kernel_us([_Event(flush, 0, 60)]))


def test_targets_are_judged_on_kernel_time_too():
    def row(impl, t, us, group="qk", scenario="q+k", op="apply_qk"):
        return {"group": group, "scenario": scenario, "op": op, "shape": "s", "implementation": impl, "timing": t,
                "us": us, "pct_copy": 90.0, "gbps": 1.0, "tokens": 8, "layout": "neox"}
    rows = [row("triton", "do_bench", 38.0), row("liger-kernel", "do_bench", 35.0),
            row("triton", "kernels", 35.3), row("liger-kernel", "kernels", 36.0),
            row(baselines.SAME_BYTES_COPY, "kernels", 34.0)]
    doc = {"rows": rows, "default_backend": "triton", "device": {"type": "cuda"}}
    lines = {s["target"]: s for s in targets.summarize(doc)}
    assert lines["qk q+k speedup over Liger-Kernel"]["met"] is False
    assert lines["qk q+k speedup over Liger-Kernel (kernels)"]["met"] is True
    assert lines["qk q+k s % of a same-bytes copy (kernels)"]["value"] == pytest.approx(100 * 34.0 / 35.3)


def test_json_report_and_plot(doc, tmp_path, monkeypatch):
    path = report.write_json(doc, tmp_path)
    assert path.name == f"{doc['device_label']}-{doc['date']}.json"
    assert json.loads(path.read_text())["rows"] == json.loads(json.dumps(doc["rows"]))
    report_cli = _report_cli()
    out = tmp_path / "README-table.md"
    assert report_cli.main([str(path), "--out", str(out)]) == 0
    text = out.read_text()
    assert "### diffusion" in text and "| implementation" in text and "copy" in text.lower()
    png = path.with_suffix(".png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not png.exists()
    else:
        assert png.stat().st_size > 1000 and "![" in text
    # without matplotlib the plot is skipped, nothing raises
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert report.write_plot(doc, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_tables_are_printable(doc):
    text = report.format_tables(doc)
    for group in ("diffusion", "qk", "llm", "mrope", "backward", "dispatch"):
        assert f"### {group}" in text
    assert "targets" in text and "copy bandwidth" in text


def test_rope_index_group_runs_from_the_package():
    """The rope_index group needs no checkout: its loop, batches and setups ship in the package.
    Per setup two rows: the loop and rope_index, equal (bit_exact), with their host syncs."""
    skipped, shown = [], []
    rows = rope_index.rows(torch.device("cpu"), "tiny", skipped, shown.append)
    assert not skipped and shown == [f"rope_index {name}" for name in rope_index.SETUPS_BY_SCALE["tiny"]]
    assert [r["implementation"] for r in rows] == ["loop (transformers 4.x style)", "rope_backends.positions.rope_index"]
    for r in rows:
        for key, kind in ROW_KEYS.items():
            if key != "bytes":  # no bytes: rope_index moves no rotated tensors
                assert isinstance(r[key], kind), (key, r)
        assert r["bit_exact"] is True and r["us"] > 0 and isinstance(r["host_syncs"], int)
    assert rows[0]["host_syncs"] > rows[1]["host_syncs"]  # the loop reads per row, image and frame
    assert "host syncs" in report.format_tables({**_EMPTY_DOC, "rows": rows})


def test_rope_index_group_reports_a_failing_setup(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(rope_index, "bench_one", broken)
    skipped = []
    assert rope_index.rows(torch.device("cpu"), "tiny", skipped, lambda text: None) == []
    assert skipped == [{"group": "rope_index", "scenario": "tiny_B2_S512_2img_1vid", "reason": "failed: RuntimeError: boom"}]


def test_rope_index_study_script(tmp_path):
    """bench/studies/rope_index.py keeps its command line on top of the package's group."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_study_rope_index", ROOT / "bench" / "studies" / "rope_index.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    assert study.main(["--quick", "--devices", "cpu", "--setups", "mixed_B2_S4k_8img_2vid", "--conventions", "v4",
                       "--paths", "host", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("rope_index-cpu-*.json")
    (result,) = json.loads(path.read_text())["results"]
    assert result["equal"] is True and result["setup"] == "mixed_B2_S4k_8img_2vid"
    with pytest.raises(SystemExit):
        study.main(["--setups", "nope", "--out", str(tmp_path)])


_GENERATED = re.compile(r"<!-- generated: python bench/report.py (--compact|--targets) (\S+) [^>]*-->\n(.*?)\n"
                        r"<!-- end generated -->", re.S)


def test_result_tables_in_the_docs_are_the_ones_their_json_gives():
    """README's per-GPU tables and docs/benchmarks.md's tables and target lists are generated from
    the committed JSON (bench/report.py --compact / --targets): an edit by hand, or a JSON replaced
    without regenerating them, fails here."""
    blocks = []
    for doc_path in ("README.md", "docs/benchmarks.md"):
        for kind, json_path, body in _GENERATED.findall((ROOT / doc_path).read_text(encoding="utf-8")):
            blocks.append((doc_path, kind, json_path))
            result = report.load(ROOT / json_path)
            want = report.compact_table(result) if kind == "--compact" else report.targets_table(result)
            assert body == want, f"{doc_path}: the table from {json_path} ({kind}) differs; regenerate it"
    readme = {j for d, k, j in blocks if d == "README.md"}
    assert any("h200" in j for j in readme) and any("h100" in j for j in readme)
    assert any(d == "docs/benchmarks.md" and k == "--targets" for d, k, _ in blocks)


def test_studies_import_only_what_the_package_has():
    """The one-off studies run only on a GPU; a helper renamed or removed in the package must not
    leave one broken until then: every name a study imports from rope_backends exists."""
    import ast
    import importlib

    pytest.importorskip("triton")  # the studies import the Triton backend's modules
    studies = sorted((ROOT / "bench" / "studies").glob("*.py"))
    assert len(studies) >= 10
    checked = 0
    for path in studies:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rope_backends"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert (hasattr(module, alias.name)
                            or importlib.util.find_spec(f"{node.module}.{alias.name}") is not None), (
                        f"{path.name}: from {node.module} import {alias.name}")
                    checked += 1
    assert checked > 20


def test_time_budget_skips_the_rest_and_still_reports():
    doc = engine.run_device("cpu", ["diffusion", "dispatch", "rope_index"], budget_s=0.0, **TINY)
    assert doc["rows"] == []
    reasons = [s["reason"] for s in doc["skipped"] if "budget" in s["reason"]]
    assert len(reasons) == len(scenarios.DIFFUSION_SHAPES["tiny"]) + 1 + 2 + 1  # cases (+ neox) + dispatch + rope_index
    first = next(s for s in doc["skipped"] if "budget" in s["reason"])
    assert first["group"] == "dispatch"  # run first: a budget never cuts the cheap target
    assert "### targets" not in report.format_tables(doc)


def test_checkpoints_after_every_case():
    seen = []
    doc = engine.run_device("cpu", ["dispatch"], checkpoint=seen.append, **TINY)
    assert [len(d["rows"]) for d in seen] == [3, 6] and all(d["partial"] for d in seen)  # rb.*, eager.forward, one op
    assert doc["partial"] is False and len(doc["rows"]) == 6


def test_run_short(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(scenarios.DIFFUSION_SHAPES, "short-cpu", [(1, 16, 2, 32)])
    monkeypatch.setitem(scenarios.LLM_TOKENS, "short-cpu", [1])
    monkeypatch.setitem(scenarios.LLM_HEADS, "short-cpu", (4, 2))
    rows = engine.run_short(out_dir=str(tmp_path), device="cpu")  # the keyword python -m rope_backends check passes
    printed = capsys.readouterr().out
    assert "### diffusion" in printed and "### dispatch" in printed
    assert {r["group"] for r in rows} == {"diffusion", "llm", "dispatch"}
    assert all(r["device_type"] == "cpu" for r in rows)
    assert not {"torch.compile", "eager-strided"} & {r["implementation"] for r in rows}
    assert {r["op"] for r in rows if r["group"] == "llm"} == {"apply_cached"}
    files = list(tmp_path.glob("*-short.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["short"] is True


def test_command_line(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--device", "cpu", "--scale", "tiny", "--groups", "dispatch", "--quick",
         "--out", str(out), "--no-plot"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "### dispatch" in proc.stdout
    assert "dispatch apply tiny" in proc.stderr  # the progress line
    (path,) = out.glob("*.json")
    saved = json.loads(path.read_text())
    assert saved["command"].startswith("python -m bench --device cpu")
    assert saved["partial"] is False  # the final write replaced the per-case checkpoints
    assert {r["implementation"] for r in saved["rows"]} == {"rb.apply", "rb.apply_cached", "eager.forward", baselines.TORCH_OP}


def test_command_line_rejects_unknown_group():
    proc = subprocess.run([sys.executable, "-m", "rope_backends", "bench", "--groups", "nope"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--groups" in proc.stderr


def test_package_command_line(tmp_path, capsys):
    """``python -m rope_backends bench`` is the command (``python -m bench`` its alias): same
    options, and the JSON records the command it was given."""
    from rope_backends.__main__ import main

    out = tmp_path / "results"
    assert main(["bench", "--device", "cpu", "--scale", "tiny", "--groups", "dispatch", "--quick", "--out", str(out),
                 "--no-plot", "--skip", "eager.forward"]) == 0
    assert "### dispatch" in capsys.readouterr().out
    (path,) = out.glob("*-quick-tiny.json")
    saved = report.load(path)
    assert saved["command"].startswith("python -m rope_backends bench --device cpu")
    # --skip leaves the dispatch group alone (as before the split): only --impls selects there
    assert {r["implementation"] for r in saved["rows"]} == {"rb.apply", "rb.apply_cached", "eager.forward", baselines.TORCH_OP}
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "--budget" in capsys.readouterr().out


# results written by the engine before it was split into modules (real GPU runs)
OLD_RESULTS = ["nvidia-h100-80gb-hbm3-2026-11-23-s4.json", "nvidia-h200-2026-12-02-quick.json"]


@pytest.mark.parametrize("name", OLD_RESULTS)
def test_results_written_before_the_split_still_render(name, tmp_path, doc):
    """bench/report.py turns an old JSON into the README section, and today's documents carry
    the same top-level keys and every row key the old ones had for the same kind of row."""
    src = ROOT / "bench" / "results" / name
    old = report.load(src)
    assert set(doc) == set(old), set(doc) ^ set(old)
    old_keys = {}
    for r in old["rows"]:
        old_keys.setdefault((r["group"], r["kind"]), set()).update(r)
    for r in doc["rows"]:
        if (r["group"], r["kind"]) in old_keys:
            assert set(r) <= old_keys[(r["group"], r["kind"])] | {"note", "us_min"}, r
    for r in old["rows"]:
        for key, kind in ROW_KEYS.items():
            assert isinstance(r[key], kind) or (key == "bytes" and r["group"] == "rope_index"), (key, r)
    report_cli = _report_cli()
    out = tmp_path / "README-table.md"
    assert report_cli.main([str(src), "--out", str(out), "--no-plot"]) == 0
    text = out.read_text()
    assert old["device"]["name"] in text and "### diffusion" in text and "### dispatch" in text
    assert "eager-stack+flatten" in text  # an old file keeps its names
    assert "### targets" in text and "| yes" in text  # GPU targets are judged


def test_report_rejects_another_schema(tmp_path):
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps({"schema": "something/2", "rows": []}))
    with pytest.raises(ValueError, match="other.json: expected a bench result with schema 'rope_backends.bench/1'"):
        report.load(bad)
    proc = subprocess.run([sys.executable, "bench/report.py", str(bad)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "schema" in proc.stderr
    for flag in ("--compact", "--targets"):  # the table printers refuse it the same way, and a missing file
        assert _report_cli_exit([flag, str(bad)]) == 2
        assert _report_cli_exit([flag, str(tmp_path / "missing.json")]) == 2
    assert _report_cli_exit(["--compact", "--targets", str(bad)]) == 2  # one table at a time


def _report_cli_exit(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as stop:
        _report_cli().main(argv)
    return stop.value.code


def test_npu_path_peer_runs_the_shipped_npu_code(monkeypatch):
    """The stack+flatten peer is rope_backends.backends.npu itself (what ships), not a copy:
    with the shipped functions counted, every op's npu-path row goes through them."""
    from rope_backends.backends import npu

    calls = {"rotate": 0, "forward": 0}
    real_rotate, real_forward = npu.rotate, npu.forward

    def rotate(*a, **k):
        calls["rotate"] += 1
        return real_rotate(*a, **k)

    def forward(*a, **k):
        calls["forward"] += 1
        return real_forward(*a, **k)

    monkeypatch.setattr(npu, "rotate", rotate)
    monkeypatch.setattr(npu, "forward", forward)
    device = torch.device("cpu")
    options = implementations.Options(impls=(NPU_PATH,))
    for case in (scenarios.diffusion_cases("tiny", device)[0], scenarios.qk_cases("tiny", device)[0],
                 scenarios.llm_cases("tiny", device, graphs=False)[-1], scenarios.mrope_cases("tiny", device)[1],
                 *(c for c in scenarios.backward_cases("tiny", device) if c.layers == 1)):
        (impl,) = implementations.for_case(case, device, ["eager"], options)
        before = dict(calls)
        outs = impl.prepare(case.make(0))()
        assert calls != before, case.op
        want = case.reference(case.make(0), case.layout)
        assert all(torch.equal(o.view(torch.int16), w.view(torch.int16)) for o, w in zip(outs, want)), case.scenario


def test_old_implementation_names_still_select():
    """--impls / --skip accept the name the npu-path peer had before it ran the shipped code."""
    options = implementations.Options(skip=("eager-stack+flatten",))
    assert not options.keep(NPU_PATH) and options.keep("eager-strided")
    assert implementations.Options(impls=("eager-stack+flatten",)).selects(NPU_PATH)
    assert implementations.canonical("eager-stack+flatten") == NPU_PATH == implementations.canonical(NPU_PATH)


def test_old_engine_module_is_a_deprecated_alias(monkeypatch):
    import importlib

    import rope_backends.benchmark as bench

    monkeypatch.delitem(sys.modules, "rope_backends.benchmarking", raising=False)
    with pytest.warns(DeprecationWarning, match="rope_backends.benchmark"):
        old = importlib.import_module("rope_backends.benchmarking")
    for name in ("run", "run_short", "run_device", "summarize", "format_tables", "write_json", "SCHEMA", "GROUPS"):
        assert getattr(old, name) is getattr(bench, name), name


def test_importing_the_bench_is_cheap():
    """The subpackage imports no optional package and no Triton (peers load theirs when built)."""
    code = ("import sys, rope_backends.benchmark, rope_backends.benchmark.cli; "
            "print(sorted(m for m in ('triton', 'transformers', 'matplotlib', 'liger_kernel', 'flashinfer', "
            "'flash_attn') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_rotating_buffers():
    calls = []
    fns = [lambda i=i: calls.append(i) for i in range(3)]
    run = timing.rotating(fns)
    for _ in range(7):
        run()
    assert calls == [0, 1, 2, 0, 1, 2, 0]
    assert timing.rotating(fns[:1]) is fns[0]
    cpu = torch.device("cpu")
    llc = timing.cache_bytes(cpu)
    assert timing.buffers(2 * llc, cpu) == 1  # exceeds the cache on its own
    assert timing.buffers(1, cpu) == timing.ROTATE_CAP["cpu"]
    assert timing.buffers(llc, cpu) == min(timing.ROTATE_CAP["cpu"], 4)


def test_device_label_is_a_file_name():
    from rope_backends.benchmark import machine

    assert machine.device_label({"type": "cuda", "name": "NVIDIA H100 80GB HBM3"}) == "nvidia-h100-80gb-hbm3"
    label = machine.device_label(machine.device_info(torch.device("cpu")))
    assert label.startswith("cpu-") and label.endswith("c") and all(c.isalnum() or c == "-" for c in label)


@pytest.mark.parametrize("op", ["apply", "apply_cached"])
def test_direct_launch_floor_runs_once_per_call(monkeypatch, op):
    """The dispatch group's floor (the compiled launcher called directly) must leave its inputs
    alone while it is built: JITFunction.run compiles *and* launches, and an in-place floor built
    on the real inputs read "not bit-exact" on the H100 (rotated twice). A stand-in kernel adds
    1 to its outputs; after building, the inputs are untouched, and one call adds exactly 1."""
    from rope_backends.backends.triton import launch

    live = {}  # address -> tensor: the launch functions get addresses, as Triton's take them

    def bump(ptrs):  # out = in + 1 for (q, qo) and (k, ko)
        ptrs = [live.get(p, p) if isinstance(p, int) else p for p in ptrs]
        for t in ptrs:
            if isinstance(t, torch.Tensor):
                live[t.data_ptr()] = t
        for i, o in ((ptrs[0], ptrs[1]), (ptrs[2], ptrs[3])):
            if o is not None:
                o.copy_(i + 1)

    class Compiled:
        def __getitem__(self, grid):
            return lambda *ptrs, stream=None: bump(ptrs)

    class Kernel:
        run_calls = 0

        def run(self, *ptrs, grid=None, warmup=False, **meta):
            bump(ptrs)
            return Compiled()

    kernel = Kernel()
    with monkeypatch.context() as m:  # the real kernel's parameter names, imported as the interpreter's
        m.setenv("TRITON_INTERPRET", "1")  # (a process must not hold a GPU-compiled kernel module then
        launch._kernel()                   # run tests/test_triton_backend.py)
    monkeypatch.setattr(launch, "_KERNEL", kernel)
    monkeypatch.setattr(launch, "_PLANS", {})
    monkeypatch.setattr(launch, "_RAW", [False])
    monkeypatch.setattr(launch.environment, "triton_interpret", lambda: False)
    monkeypatch.setattr(launch, "_raw_stream", lambda device: 0)
    monkeypatch.setattr(launch, "_current_device", lambda: 0)
    real_empty_like = torch.empty_like

    def recorded_empty_like(t, *a, **kw):  # outputs made per call: known to the stand-in by address
        out = real_empty_like(t, *a, **kw)
        live[out.data_ptr()] = out
        return out
    monkeypatch.setattr(torch, "empty_like", recorded_empty_like)
    case = next(c for c in scenarios.dispatch_cases(torch.device("cpu")) if c.op == op)
    d = case.make(0)
    before = {k: v.clone() for k, v in d.items() if isinstance(v, torch.Tensor)}
    run = baselines.direct_triton(d, op)
    for t in d.values():
        if isinstance(t, torch.Tensor):
            live[t.data_ptr()] = t
    for key, value in before.items():
        assert torch.equal(d[key], value), f"{key} changed while the floor was built"
    outs = run()
    names = ("x",) if op == "apply" else ("q", "k")
    for name, out in zip(names, outs):
        assert torch.equal(out, before[name] + 1), name
