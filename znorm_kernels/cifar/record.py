"""Keep finished runs where a repository can hold them, so that a comparison grows over many sessions.

``python -m znorm_kernels.cifar.record RUN_DIR... --to DEST`` copies each finished run's ``config.json`` and
``metrics.jsonl`` (what the report reads; no checkpoint, no plots) into ``DEST/<run folder name>/``. A run
is finished when its metrics reach the epochs its config asks for; unfinished runs are left out and named.
A run already recorded with the same files is skipped; one recorded under the same name with other files
(another window's run of another configuration, or other results) is an error that names it, and nothing is
copied: a record is never overwritten. ``python -m znorm_kernels.cifar.report DEST`` then reports on every
recorded run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .report import Run, find_runs

__all__ = ["Recorded", "main", "record_runs"]

FILES = ("config.json", "metrics.jsonl")


@dataclass
class Recorded:
    """What ``record_runs`` did, by run folder name."""

    copied: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)  # recorded before, with the same files
    unfinished: list[str] = field(default_factory=list)


def record_runs(paths: list[str | os.PathLike], dest: str | os.PathLike) -> Recorded:
    """Copy the finished runs found in ``paths`` (run folders or folders of them) into ``dest``. Raises
    FileExistsError, before copying anything, where a run's name is recorded with other files or where two
    of the runs given share a name."""
    dest = Path(dest)
    done = Recorded()
    todo: list[Run] = []
    names: dict[str, Path] = {}
    for run in find_runs(paths):
        name = run.path.name
        if not run.finished:
            done.unfinished.append(name)
            continue
        if name in names:
            raise FileExistsError(f"two runs named {name}: {names[name]} and {run.path}; record them apart")
        names[name] = run.path
        target = dest / name
        if target.exists():
            same = all(
                (target / f).is_file() and (target / f).read_bytes() == (run.path / f).read_bytes()
                for f in FILES
            )
            if not same:
                raise FileExistsError(
                    f"{target} already records another {name} (other config or results than {run.path}); "
                    "a record is never overwritten: give the new run another folder name"
                )
            done.present.append(name)
            continue
        todo.append(run)
    for run in todo:
        target = dest / run.path.name
        target.mkdir(parents=True)
        for f in FILES:
            (target / f).write_bytes((run.path / f).read_bytes())
        done.copied.append(run.path.name)
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m znorm_kernels.cifar.record",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("runs", nargs="+", help="run folders, or folders holding run folders")
    parser.add_argument("--to", required=True, help="the folder of recorded runs")
    args = parser.parse_args(argv)
    try:
        done = record_runs(args.runs, args.to)
    except (FileNotFoundError, FileExistsError, json.JSONDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"recorded {len(done.copied)} run(s) in {args.to}: {', '.join(done.copied) or '-'}")
    if done.present:
        print(f"already recorded: {', '.join(done.present)}")
    if done.unfinished:
        print(f"unfinished, left out: {', '.join(done.unfinished)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
