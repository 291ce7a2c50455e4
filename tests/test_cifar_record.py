"""Recording finished runs for the repository (znorm_kernels.cifar.record): what is copied, what is left
out, and that a record is never overwritten."""

from __future__ import annotations

import json

import pytest

from znorm_kernels.cifar.record import main, record_runs
from znorm_kernels.cifar.report import main as report_main


def fake_run(folder, method: str, seed: int, accs: list[float], epochs: int | None = None) -> None:
    folder.mkdir(parents=True)
    config = {"model": "resnet8", "optimizer": "sgdm", "method": method, "seed": seed, "lr": 0.1}
    config["epochs"] = len(accs) if epochs is None else epochs
    (folder / "config.json").write_text(json.dumps(config))
    rows = [{"epoch": i + 1, "train_loss": 1.0, "test_acc": a} for i, a in enumerate(accs)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "checkpoint.pt").write_bytes(b"not for the repository")


def test_finished_runs_are_copied_without_checkpoints(tmp_path):
    runs, dest = tmp_path / "runs", tmp_path / "records"
    fake_run(runs / "a-seed0", "baseline", 0, [0.5, 0.6])
    fake_run(runs / "b-seed0", "znorm", 0, [0.4, 0.7])
    fake_run(runs / "c-seed1", "znorm", 1, [0.4], epochs=2)  # one epoch of two: unfinished
    done = record_runs([runs], dest)
    assert (done.copied, done.present, done.unfinished) == (["a-seed0", "b-seed0"], [], ["c-seed1"])
    assert sorted(p.name for p in dest.iterdir()) == ["a-seed0", "b-seed0"]
    for name in ("a-seed0", "b-seed0"):
        assert sorted(p.name for p in (dest / name).iterdir()) == ["config.json", "metrics.jsonl"]
        for f in ("config.json", "metrics.jsonl"):
            assert (dest / name / f).read_bytes() == (runs / name / f).read_bytes()
    again = record_runs([runs], dest)
    assert (again.copied, again.present) == ([], ["a-seed0", "b-seed0"])


def test_a_record_is_never_overwritten(tmp_path):
    first, second, dest = tmp_path / "w1", tmp_path / "w2", tmp_path / "records"
    fake_run(first / "a-seed0", "baseline", 0, [0.5, 0.6])
    record_runs([first], dest)
    fake_run(second / "a-seed0", "baseline", 0, [0.5, 0.9])  # another window's run under the same name
    fake_run(second / "z-seed3", "znorm", 3, [0.1])
    with pytest.raises(FileExistsError, match="a record is never overwritten"):
        record_runs([second], dest)
    assert json.loads((dest / "a-seed0" / "metrics.jsonl").read_text().splitlines()[-1])["test_acc"] == 0.6
    assert not (dest / "z-seed3").exists(), "nothing is copied when one run conflicts"


def test_two_runs_of_one_name_in_one_call_are_refused(tmp_path):
    fake_run(tmp_path / "w1" / "a-seed0", "baseline", 0, [0.5])
    fake_run(tmp_path / "w2" / "a-seed0", "baseline", 0, [0.5])
    with pytest.raises(FileExistsError, match="two runs named a-seed0"):
        record_runs([tmp_path / "w1", tmp_path / "w2"], tmp_path / "records")
    assert not (tmp_path / "records").exists()


def test_the_command_records_and_the_report_reads_the_records(tmp_path, capsys):
    runs, dest = tmp_path / "runs", tmp_path / "records"
    fake_run(runs / "a-seed0", "baseline", 0, [0.5, 0.6])
    fake_run(runs / "b-seed0", "znorm", 0, [0.4, 0.7])
    fake_run(runs / "c-seed0", "gc", 0, [0.4], epochs=3)
    assert main([str(runs), "--to", str(dest)]) == 0
    out = capsys.readouterr().out
    assert "recorded 2 run(s)" in out and "unfinished, left out: c-seed0" in out
    assert main([str(runs), "--to", str(dest)]) == 0
    assert "already recorded: a-seed0, b-seed0" in capsys.readouterr().out
    assert main([str(tmp_path / "nothing"), "--to", str(dest)]) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert report_main([str(dest), "--out", str(tmp_path / "report")]) == 0
    assert "| resnet8 | SGDM | ZNorm | 0 | +10.00 |" in (tmp_path / "report" / "results.md").read_text()
