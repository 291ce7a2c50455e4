"""The training report's paired comparison (znorm_kernels.cifar.paired): the t quantiles, the pairing by
seed, and what it says when seeds are missing, single or duplicated."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest

from znorm_kernels.cifar.paired import compare, mixed_groups, paired_markdown, t_quantile
from znorm_kernels.cifar.report import Run


def _run(method: str, seed: int, acc: float, *, model="resnet56", optimizer="sgdm", epoch=1) -> Run:
    config = {"model": model, "method": method, "optimizer": optimizer, "seed": seed, "epochs": 1}
    return Run(
        Path(f"/runs/{model}-{optimizer}-{method}-{seed}"), config, [{"epoch": epoch, "test_acc": acc}]
    )


def paired_rows(runs, metric):
    return compare(runs, metric).rows


def _final(run: Run) -> float:
    return run.metrics[-1]["test_acc"]


@pytest.mark.parametrize(
    ("p", "df", "expected"),
    # Student-t tables (two-sided 95%: p = 0.975; one-sided 95%: p = 0.95).
    [(0.975, 1, 12.7062), (0.975, 2, 4.3027), (0.975, 4, 2.7764), (0.975, 10, 2.2281), (0.975, 30, 2.0423),
     (0.95, 5, 2.0150), (0.995, 3, 5.8409), (0.975, 1000, 1.9623), (0.9995, 1, 636.6192),
     (0.9995, 2, 31.5991), (0.9995, 10, 4.5869), (0.6, 5, 0.2672)],
)  # fmt: skip
def test_t_quantile_matches_the_tables(p, df, expected):
    assert t_quantile(p, df) == pytest.approx(expected, abs=6e-5)  # the tables' four decimals


@pytest.mark.parametrize(("p", "df"), [(0.5, 3), (1.0, 3), (0.3, 3), (0.975, 0)])
def test_t_quantile_rejects_what_it_cannot_answer(p, df):
    with pytest.raises(ValueError, match="t_quantile needs"):
        t_quantile(p, df)


def test_differences_are_paired_by_seed():
    runs = [
        _run("baseline", 0, 80.0),
        _run("baseline", 1, 81.0),
        _run("baseline", 2, 79.0),
        # Listed out of seed order: pairing is by seed, not by position.
        _run("znorm", 2, 80.0),
        _run("znorm", 0, 82.0),
        _run("znorm", 1, 81.5),
    ]
    (row,) = paired_rows(runs, _final)
    assert (row.model, row.optimizer, row.method) == ("resnet56", "sgdm", "znorm")
    assert row.seeds == (0, 1, 2)
    assert row.diffs == (2.0, 0.5, 1.0)
    assert row.unpaired == ()
    assert row.mean == pytest.approx(3.5 / 3)
    assert row.sd == pytest.approx(statistics.stdev([2.0, 0.5, 1.0]))
    half = 4.302652729911275 * row.sd / math.sqrt(3)
    lo, hi = row.interval()
    assert (lo, hi) == (pytest.approx(row.mean - half, abs=1e-6), pytest.approx(row.mean + half, abs=1e-6))


def test_unpaired_seeds_are_left_out_and_named():
    runs = [_run("baseline", 0, 70.0), _run("baseline", 1, 72.0), _run("gc", 0, 71.0), _run("gc", 1, 75.0)]
    runs += [_run("gc", 5, 99.0)]  # the baseline never finished seed 5
    (row,) = paired_rows(runs, _final)
    assert row.seeds == (0, 1) and row.diffs == (1.0, 3.0) and row.unpaired == (5,)
    text = paired_markdown(compare(runs, _final))
    assert "resnet56/sgdm/gc: 5" in text
    assert "| resnet56 | sgdm | gc | 0, 1 | +2.00 | 1.41 |" in text


def test_groups_do_not_mix_and_need_a_baseline():
    runs = [
        _run("baseline", 0, 50.0),
        _run("znorm", 0, 60.0),
        _run("baseline", 0, 10.0, optimizer="adam"),
        _run("znorm", 0, 15.0, optimizer="adam"),
        _run("znorm", 0, 30.0, model="resnet110"),  # no resnet110 baseline: no row
        _run("clip", 3, 40.0),  # the baseline has no seed 3: no row
    ]
    rows = paired_rows(runs, _final)
    assert [(r.model, r.optimizer, r.method, r.diffs) for r in rows] == [
        ("resnet56", "adam", "znorm", (5.0,)),
        ("resnet56", "sgdm", "znorm", (10.0,)),
    ]


def test_one_seed_gives_no_interval():
    (row,) = paired_rows([_run("baseline", 0, 50.0), _run("znorm", 0, 48.5)], _final)
    assert row.sd is None and row.interval() is None
    comparison = compare([_run("baseline", 0, 50.0), _run("znorm", 0, 48.5)], _final)
    line = next(
        x
        for x in paired_markdown(comparison, {"znorm": "ZNorm", "sgdm": "SGDM"}).splitlines()
        if "ZNorm" in x
    )
    assert line == "| resnet56 | SGDM | ZNorm | 0 | -1.50 |  | one seed: none | -1.50 |"


def test_a_run_found_twice_is_an_error():
    runs = [_run("baseline", 0, 50.0), _run("znorm", 0, 48.5), _run("znorm", 0, 49.0)]
    with pytest.raises(ValueError, match="two finished runs of resnet56, sgdm, znorm, seed 0"):
        paired_rows(runs, _final)


def test_groups_of_several_configurations_are_left_out_and_named():
    runs = [_run("baseline", s, 50.0 + s) for s in (0, 1)]
    runs += [_run("znorm", s, 52.0 + s) for s in (0, 1)]
    runs += [_run("gc", 0, 51.0), _run("gc", 1, 53.0)]
    runs[-1].config["lr"] = 0.5  # one gc run from another sweep's choice
    runs += [_run("baseline", s, 40.0, optimizer="adam") for s in (0, 1)]
    runs[-1].config["weight_decay"] = 1e-4
    runs += [_run("znorm", 0, 45.0, optimizer="adam")]
    assert mixed_groups(runs) == {
        ("resnet56", "adam", "baseline"): ["weight_decay"],
        ("resnet56", "sgdm", "gc"): ["lr"],
    }
    rows = paired_rows(runs, _final)
    # sgdm znorm stays; sgdm gc is mixed; adam znorm's baseline is mixed.
    assert [(r.optimizer, r.method, r.diffs) for r in rows] == [("sgdm", "znorm", (2.0, 2.0))]
    text = paired_markdown(compare(runs, _final))
    assert (
        "Left out entirely: resnet56/adam/baseline (its runs differ in weight_decay); resnet56/adam/znorm "
        "(its baseline's runs differ in weight_decay); resnet56/sgdm/gc (its runs differ in lr)." in text
    )


def test_settings_that_do_not_change_results_do_not_mix():
    runs = [
        _run("baseline", 0, 50.0),
        _run("znorm", 0, 51.0),
        _run("znorm", 1, 52.0),
        _run("baseline", 1, 50.5),
    ]
    runs[1].config["device"] = "cuda"  # config.RUNTIME_FIELDS
    runs[2].config["threads"] = 4
    assert mixed_groups(runs) == {}
    assert [r.diffs for r in paired_rows(runs, _final)] == [(1.0, 1.5)]


def test_a_method_is_paired_only_with_a_baseline_of_the_same_setting():
    runs = [_run("baseline", s, 50.0) for s in (0, 1)] + [_run("znorm", s, 60.0) for s in (0, 1)]
    runs += [_run("gc", s, 70.0) for s in (0, 1)]
    for r in runs[2:4]:
        r.config["dataset"] = "fashion-mnist"  # another dataset than the baseline's: no pair
    for r in runs[4:]:
        r.config["lr"] = 0.5  # a method's own learning rate: a pair
    got = compare(runs, _final)
    assert [(r.method, r.diffs) for r in got.rows] == [("gc", (20.0, 20.0))]
    assert got.left_out == {("resnet56", "sgdm", "znorm"): "it differs from its baseline in dataset"}


def test_unfinished_runs_are_not_compared_and_are_named():
    runs = [_run("baseline", s, 50.0) for s in (0, 1)] + [_run("znorm", 0, 51.0)]
    runs.append(_run("znorm", 1, 10.0, epoch=0))  # stopped short of its one epoch
    got = compare(runs, _final)
    assert [(r.method, r.seeds) for r in got.rows] == [("znorm", (0,))]
    assert got.unfinished == ["resnet56/sgdm/znorm seed 1"]
    assert "Unfinished runs, not compared: resnet56/sgdm/znorm seed 1." in paired_markdown(got)


def test_a_seed_repeated_in_a_mixed_group_is_not_an_error():
    runs = [_run("baseline", 0, 50.0), _run("znorm", 0, 51.0), _run("znorm", 0, 52.0)]
    runs[2].config["lr"] = 0.3  # two configurations of one seed: mixed, left out
    got = compare(runs, _final)
    assert got.rows == [] and got.left_out == {("resnet56", "sgdm", "znorm"): "its runs differ in lr"}


def test_groups_without_a_comparison_are_named():
    runs = [_run("baseline", 0, 50.0), _run("znorm", 3, 51.0), _run("gc", 0, 40.0, model="resnet110")]
    got = compare(runs, _final)
    assert got.rows == []
    assert got.left_out == {
        ("resnet110", "sgdm", "gc"): "no finished baseline run",
        ("resnet56", "sgdm", "znorm"): "no seed in common with its baseline",
    }
