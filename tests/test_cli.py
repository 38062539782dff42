"""``python -m rope_backends``: the ``info``, ``check`` and ``bench`` subcommands (``tune``'s logic is
tests/test_triton_backend.py's, ``bench``'s engine tests/test_bench.py's). ``check`` runs the real
runner on a slice of the fast tier; fake backends (the ``fakes`` fixture) stand in for a backend
that hijacks automatic dispatch or gets results wrong."""

from __future__ import annotations

import sys
import types

import pytest
import torch

import rope_backends as rb
from rope_backends import reference
from rope_backends.registry import Backend


@pytest.fixture
def small_tier(monkeypatch):
    """The CLI runs the real runner on a slice of the fast tier (the whole tier is test_conformance's).
    The tests pass ``--device cpu``: on a GPU machine ``check`` would also run eager on cuda (and
    automatic dispatch there picks triton), which these CPU-written expectations do not describe."""
    from rope_backends.testing import cases as case_data
    from rope_backends.testing import runner

    subset = case_data.sample_cases()[::40]
    monkeypatch.setattr(case_data, "cases_for", lambda *a, **k: subset)
    monkeypatch.setattr(runner, "cases_for", lambda *a, **k: subset)
    return subset


def test_cli_info(monkeypatch, capsys, fake_gpus):
    from rope_backends.__main__ import main

    fake_gpus(1, "AMD Instinct MI300X")
    monkeypatch.setattr(torch.version, "hip", "6.2.41133")
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "GPU vendor  AMD (ROCm" in out and "cuda:0 AMD Instinct MI300X" in out
    assert "cpu   -> eager" in out
    for b in rb.list_backends():
        assert f"\n{b.name} " in out


def test_cli_check_passes_and_expect(fakes, capsys, small_tier):
    from rope_backends.__main__ import main

    assert main(["check", "--device", "cpu", "--backend", "eager", "--expect", "eager"]) == 0
    out = capsys.readouterr().out
    assert "eager    cpu" in out and "picks eager for every kind of call" in out and "OK in" in out
    fakes.add("rb_cli_hijack", priority=10_000)  # automatic dispatch on cpu now picks this one
    assert main(["check", "--device", "cpu", "--backend", "eager", "--expect", "eager"]) == 1
    out = capsys.readouterr().out
    assert "apply_qk float16 interleaved on cpu: rb_cli_hijack" in out and "FAILED" in out


def test_cli_check_shards_cover_the_tier_once(capsys, small_tier):
    from rope_backends.__main__ import main

    seen = []
    for k in range(3):
        assert main(["check", "--device", "cpu", "--backend", "eager", "--shard", f"{k}/3", "-v"]) == 0
        lines = capsys.readouterr().out.splitlines()
        seen += [ln.split()[-1] for ln in lines if ln.strip().startswith("ok ") and "error:" not in ln]
        assert any("error:" in ln for ln in lines) == (k == 0)  # the error catalogue runs once
    assert sorted(seen) == sorted(c.name for c in small_tier)
    for bad in ("3/3", "x/2", "1"):
        with pytest.raises(SystemExit):
            main(["check", "--shard", bad])


def test_shards_keep_each_kernel_group_in_one_process():
    """check --shard gives whole kernel groups to one shard (each compiled variant is built once),
    covers the tier exactly once, and balances the shards within one group's size."""
    from rope_backends.__main__ import _shard_cases
    from rope_backends.testing import cases as case_data

    tier = case_data.sample_cases()
    for n in (1, 3, 12):
        shards = [_shard_cases(tier, k, n) for k in range(n)]
        assert sorted(c.name for s in shards for c in s) == sorted(c.name for c in tier)
        owner = {}
        for k, shard in enumerate(shards):
            assert shard == sorted(shard, key=tier.index), "tier order within a shard"
            for case in shard:
                assert owner.setdefault(case.kernel_group, k) == k, f"{case.kernel_group} split over shards"
        sizes = [len(s) for s in shards]
        biggest = max(sum(1 for c in tier if c.kernel_group == g) for g in owner)
        assert max(sizes) - min(sizes) <= biggest


def test_cli_check_names_runs_exactly_the_named_cases(capsys, small_tier, tmp_path):
    """--names FILE (what a time-boxed GPU run did not reach) runs those cases and error cases
    only; a file naming nothing of the tier fails instead of passing as "0 failed"."""
    from rope_backends.__main__ import main
    from rope_backends.testing import cases as case_data

    wanted = [small_tier[1].name, small_tier[-1].name]
    error = f"error:{case_data.error_cases()[0].name}"
    names = tmp_path / "names.txt"
    names.write_text(f"# not reached\n{wanted[0]}\n\n{wanted[1]}  # trailing comment\n{error}\nnot-a-case\n")
    assert main(["check", "--device", "cpu", "--backend", "eager", "--names", str(names), "-v"]) == 0
    lines = capsys.readouterr().out.splitlines()
    ran = [ln.split()[-1] for ln in lines if ln.strip().startswith("ok ")]
    assert sorted(ran) == sorted(wanted + [error])
    assert any("1 of the names are not cases" in ln for ln in lines)
    bogus = tmp_path / "bogus.txt"
    bogus.write_text("not-a-case\n")
    assert main(["check", "--device", "cpu", "--backend", "eager", "--names", str(bogus)]) == 2
    assert "none of the 1 names" in capsys.readouterr().out
    for bad in (str(tmp_path / "missing.txt"), str(tmp_path / "empty.txt")):
        (tmp_path / "empty.txt").write_text("# nothing\n")
        with pytest.raises(SystemExit):
            main(["check", "--names", bad])


def test_cli_check_reports_failures(fakes, capsys, small_tier):
    from rope_backends.__main__ import main

    def off_by_one(args):
        outs = reference.run(args)
        for o in outs:
            if o.numel():
                o.view(-1)[0] = torch.nextafter(o.view(-1)[0], torch.tensor(float("inf"), dtype=o.dtype)) \
                    if o.is_contiguous() else o.view(-1)[0]
        return outs

    rb.register_backend(Backend(name="rb_cli_bad", device_types=("cpu",), priority=-1, forward=off_by_one))
    fakes.names.append("rb_cli_bad")
    assert main(["check", "--backend", "rb_cli_bad", "--max-failures", "3"]) == 1
    out = capsys.readouterr().out
    assert "rb_cli_bad  cpu" in out and "failure(s):" in out and "elements differ" in out
    assert main(["check", "--backend", "rb_not_registered"]) == 2


def test_cli_bench_hook(monkeypatch, capsys):
    from rope_backends import __main__ as cli

    calls = []
    module = types.ModuleType("rope_backends.benchmark")
    module.run_short = lambda device=None: calls.append(device) or 0
    monkeypatch.setitem(sys.modules, "rope_backends.benchmark", module)
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: object())
    assert cli._run_bench("cpu") == 0 and calls == ["cpu"]
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: None)
    assert cli._run_bench(None) == 0
    assert "bench: not installed" in capsys.readouterr().out

