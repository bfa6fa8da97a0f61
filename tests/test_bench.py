"""The benchmark's baselines compute what they claim, its timed closures do what their
direction says, and its CPU targets read the rows right (bench/topn_create.py,
bench/losses.py). Timing itself is never tested."""

from __future__ import annotations

import contextlib
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from bench import losses as bench_losses
from bench import topn_create as bench_topn
from topn_kernels import reference


def test_plain_formulation_is_topn_create_at_one_set_size():
    """compile_plain's function equals the reference (score_norm "selected", sorted) for an
    int n, on scores without ties."""
    g = torch.Generator().manual_seed(0)
    query, angles = torch.randn(6, 3, generator=g), torch.randn(20, 3, generator=g)
    table, bias, film = (torch.randn(s, generator=g) for s in ((20, 5), (6, 5), (4, 5)))
    x, _, index, weight = bench_topn.plain_topn_create(query, angles, table, bias, 7, film, n_max=7)
    want = reference.topn_create(query, angles, table, bias, 7, film)
    torch.testing.assert_close(x, want[0])
    assert torch.equal(index, want[2])
    torch.testing.assert_close(weight, want[3])


@pytest.mark.parametrize("direction", ["step", "accum4"])
def test_training_directions_accumulate_into_grad_then_clear(direction):
    """A step (or four accumulated ones) accumulates every input's gradient into ``.grad``
    (not ``autograd.grad``: that leaves ``.grad`` alone), then sets it to None."""
    shape = bench_topn.Shape("t", 3, 10, 4, 3, 5)
    inputs, n, n_max = bench_topn.make_inputs(shape, torch.device("cpu"))
    accumulated = []
    for t in inputs:
        t.register_post_accumulate_grad_hook(lambda t: accumulated.append(t.grad.clone()))
    call = bench_topn.timed_call(reference.topn_create, inputs, n, n_max, direction)
    call()
    steps = 4 if direction == "accum4" else 1
    assert len(accumulated) == len(inputs) * steps
    if steps == 4:  # the fourth accumulation holds four times the first's gradient
        for first, last in zip(
            accumulated[: len(inputs)], accumulated[-len(inputs) :], strict=True
        ):
            torch.testing.assert_close(last, 4 * first)
    assert all(t.grad is None for t in inputs)


def _row(op, shape, direction, provider, ms):
    return {"op": op, "shape": shape, "direction": direction, "provider": provider, "ms": ms}


def test_cpu_targets_compare_native_with_the_fastest_baseline():
    rows = [
        _row("topn_create", "paper_n35", "fwd", "compile", 4.0),
        _row("topn_create", "paper_n35", "fwd", "compile_plain", 3.0),
        _row("topn_create", "paper_n35", "fwd", "native", 1.0),
        _row("topn_create", "paper_n35", "step", "eager", 5.0),
        _row("topn_create", "paper_n35", "step", "native", 4.0),
        _row("topn_create", "paper_n35", "accum4", "native", 2.0),
        _row("topn_create", "paper_n35", "accum4", "native_nocache", 3.0),
        _row("topn_create", "tiny", "fwd", "native", 0.030),
        _row("topn_create", "tiny", "fwd", "native_op", 0.025),
    ]
    got = {
        (t["shape"], t["target"]): (t["measured"], t["met"]) for t in bench_topn.cpu_targets(rows)
    }
    assert got[("paper_n35", "fwd: native >= 3x the fastest baseline")] == (3.0, True)
    assert got[("paper_n35", "step: native >= 2x the fastest baseline")] == (1.25, False)
    assert got[("paper_n35", "accum4: with the pool >= 1x without")] == (1.5, True)
    assert got[("point_cloud", "fwd: native >= 3x the fastest baseline")] == (None, False)
    measured, met = got[("tiny", "validation + dispatch overhead <= 10 us")]
    assert measured == pytest.approx(5.0) and met


def test_loss_cpu_targets_read_the_paper_rows():
    rows = [
        _row("chamfer_loss", "paper", "step", "compile", 3.0),
        _row("chamfer_loss", "paper", "step", "auto", 1.0),
        _row("chamfer_loss", "paper", "fwd", "compile", 1.0),
        _row("chamfer_loss", "paper", "fwd", "auto", 2.0),
        _row("chamfer_loss", "n1024", "step", "auto", 0.1),
    ]
    got = {t["target"]: (t["measured"], t["met"]) for t in bench_losses.cpu_targets(rows)}
    assert got["chamfer_loss step: auto >= 2x torch.compile(reference)"] == (3.0, True)
    assert got["chamfer_loss fwd: auto >= 1x torch.compile(reference)"] == (0.5, False)
    assert got["valency_penalty step: auto >= 2x torch.compile(reference)"] == (None, False)


def test_heavy_cases_time_repeated_calls_and_report_their_median(monkeypatch):
    """The aggregation of a heavy case's calls, on a fake clock: calls of 10, 50 and 20 ms."""
    from bench import timing

    ticks = iter([0.0, 0.010, 1.0, 1.050, 2.0, 2.020])
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    calls, peaks = [], []

    def peak_bytes(timed, device):
        timed()
        peaks.append(len(calls))
        return 0

    t, peak = timing.time_once_with_peak(
        lambda: calls.append(1), torch.device("cpu"), peak_bytes, repeats=3
    )
    assert len(calls) == 3 and peaks == [1] and peak == 0  # the peak comes from the first call
    assert (t.ms, t.ms_p20, t.ms_p80) == pytest.approx((20.0, 10.0, 50.0))


def test_cases_of_one_epoch_benchmark_are_timed_in_turns(monkeypatch):
    """Heavy cases of one shape with repeated calls are grouped, and their calls alternate
    (the peak of each from its own first call); every other case stays alone."""
    from bench import timing
    from bench.cases import Case
    from bench.run import in_turns

    def case(shape, provider, heavy=True, repeats=3, op="setvae_epoch"):
        return Case(
            op, shape, "fwd+bwd", provider, {}, None, lambda: None, heavy=heavy, repeats=repeats
        )

    cases = [
        case("a", "eager"),
        case("a", "tuned"),
        case("b", "eager"),
        case("b", "tuned", repeats=1),
        case("c", "eager", heavy=False),
        case("c", "tuned", heavy=False),
        case("d", "eager", op="other"),
        case("a", "tuned"),
        replace(case("e", "eager"), context=lambda: contextlib.nullcontext()),
        replace(case("e", "tuned"), context=lambda: contextlib.nullcontext()),
    ]
    groups = [[(c.shape, c.provider) for c in g] for g in in_turns(cases)]
    assert groups == [
        [("a", "eager"), ("a", "tuned")],
        [("b", "eager")],
        [("b", "tuned")],
        [("c", "eager")],
        [("c", "tuned")],
        [("d", "eager")],
        [("a", "tuned")],
        [("e", "eager")],  # a context of its own: entered around its calls, alone
        [("e", "tuned")],
    ]

    now = [0.0]  # a fake clock that only the timed calls move: x takes 1 s, y 3 s

    def advance(label, seconds):
        order.append(label)
        now[0] += seconds

    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    order = []

    def peak_bytes(timed, device):
        timed()
        return len(order)

    out = timing.time_in_turns_with_peak(
        [lambda: advance("x", 1.0), lambda: advance("y", 3.0)],
        torch.device("cpu"),
        peak_bytes,
        repeats=4,
    )
    assert order == ["x", "y", "y", "x", "x", "y", "y", "x"]  # A B, B A, A B, B A
    assert [peak for _, peak in out] == [1, 2]  # each peak from its own first call
    assert [t.ms for t, _ in out] == [1000.0, 3000.0]


def test_setvae_epoch_targets_read_the_rows():
    from bench import setvae_epoch
    from bench.cases import format_targets

    rows = [
        {"op": "setvae_epoch", "shape": "authors_topn", "provider": "eager", "ms": 1800.0},
        {"op": "setvae_epoch", "shape": "authors_topn", "provider": "tuned", "ms": 900.0},
        {"op": "setvae_epoch", "shape": "authors_iid", "provider": "eager", "ms": 1500.0},
        {"op": "setvae_epoch", "shape": "authors_iid", "provider": "tuned", "ms": 1100.0},
        {"op": "topn_create", "shape": "authors_mlp", "provider": "tuned", "ms": 1.0},
    ]
    topn = [t for t in setvae_epoch.cpu_targets(rows) if t["shape"] == "authors_topn"]
    assert [(t["measured"], t["met"]) for t in topn] == [(2.0, True), (0.9, True)]
    iid = [t for t in setvae_epoch.cpu_targets(rows) if t["shape"] == "authors_iid"]
    assert [(t["measured"], t["met"]) for t in iid] == [(1500 / 1100, False), (1.1, False)]
    mlp = [t for t in setvae_epoch.cpu_targets(rows) if t["shape"] == "authors_mlp"]
    assert [t["measured"] for t in mlp] == [None, None]  # another op's row is not read
    assert "tuned <= 1.0 s an epoch: 1.10 s" in format_targets(iid)


def test_graphvae_step_cases_train_the_graph_vae_on_cpu_only():
    from bench import graphvae_step

    cases = list(graphvae_step.cases(torch.device("cpu")))
    assert {(c.shape, c.provider) for c in cases} == {
        (f"qm9_{creation}", provider)
        for creation in graphvae_step.CREATIONS
        for provider in graphvae_step.PROVIDERS
    }
    assert all(c.heavy and c.repeats > 1 and c.direction == "fwd+bwd" for c in cases)
    assert list(graphvae_step.cases(torch.device("cuda"))) == []
    for provider in graphvae_step.PROVIDERS:
        torch.manual_seed(0)
        step = graphvae_step._step("topn", provider)  # two steps taken
        params = list(step.model.parameters())
        before = [p.detach().clone() for p in params]
        assert torch.isfinite(torch.tensor(step()))
        assert all(not torch.equal(a, p) for a, p in zip(before, params, strict=True))
        assert all(p.grad is None for p in params)


def _run_cases(cases, monkeypatch, tmp_path) -> tuple[int, list[dict]]:
    """``python -m bench`` on these cases (each timed at 2 ms): its exit status and the rows it
    wrote."""
    import json

    from bench import run, timing

    monkeypatch.setattr(run, "all_cases", lambda device: cases)
    monkeypatch.setattr(run.timing, "copy_bandwidth_gbps", lambda device, budget: 1.0)
    monkeypatch.setattr(run.timing, "time_fn", lambda call, device, budget: timing.Timing(2, 1, 3))
    monkeypatch.setattr(run.memory, "peak_bytes", lambda call, device: 0)
    with pytest.raises(SystemExit) as exit_info:
        run.main(["--device", "cpu", "--out", str(tmp_path)])
    (written,) = tmp_path.glob("*.json")
    return exit_info.value.code, json.loads(written.read_text())


def _case(provider, build=lambda: lambda: None):
    from bench.cases import Case

    return Case("topn_create", "tiny", "fwd", provider, {}, None, build)


def test_an_interrupted_run_keeps_the_rows_it_measured(monkeypatch, tmp_path):
    """SIGINT (a time limit) during a case: the rows of the cases timed before it are written,
    and the run exits with status 130."""

    def interrupt():
        raise KeyboardInterrupt

    cases = [_case("eager"), _case("triton", interrupt), _case("native")]
    status, rows = _run_cases(cases, monkeypatch, tmp_path)
    assert status == 130
    assert [(r["provider"], r["ms"]) for r in rows] == [("eager", 2)]


def test_a_failing_case_is_reported_and_the_others_are_timed(monkeypatch, tmp_path, capsys):
    """A case that raises (a baseline that breaks on some machine) is reported and skipped; the
    cases after it are still timed and written, and the run exits with status 1."""

    def broken():
        raise RuntimeError("a baseline that breaks")

    cases = [_case("eager"), _case("compile_ro", broken), _case("triton")]
    status, rows = _run_cases(cases, monkeypatch, tmp_path)
    assert status == 1
    assert [r["provider"] for r in rows] == ["eager", "triton"]
    assert "a baseline that breaks" in capsys.readouterr().err


def test_a_run_interrupted_before_any_row_writes_an_empty_file(monkeypatch, tmp_path):
    """SIGINT during the first case: an empty rows file, no plot, status 130."""

    def interrupt():
        raise KeyboardInterrupt

    status, rows = _run_cases([_case("eager", interrupt)], monkeypatch, tmp_path)
    assert (status, rows) == (130, [])
    assert not list(tmp_path.glob("*.png"))
