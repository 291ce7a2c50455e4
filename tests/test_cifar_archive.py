"""The real CIFAR loading code, end to end, on small archives in torchvision's own format (pickled batches
under cifar-10-batches-py/ and cifar-100-python/): torchvision parses them, ``data.load_data`` puts them on
the device in NCHW, and the command line trains an epoch and reports. torchvision md5-checks the files of the
real archives, so the check is patched here, as torchvision's own tests do; everything else is the code a
user with the real archive runs."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from znorm_kernels.cifar import data as cdata
from znorm_kernels.cifar.__main__ import main

tvc = pytest.importorskip("torchvision.datasets.cifar")


def _batch(path, n: int, seed: int, label_key: str, classes: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)  # row-major R, G, B planes
    labels = rng.integers(0, classes, size=n).tolist()
    with open(path, "wb") as f:
        pickle.dump({"data": data, label_key: labels, "filenames": [f"{seed}-{i}.png" for i in range(n)]}, f)
    return data, labels


def make_archive(root, dataset: str, per_batch: int = 12, test: int = 20) -> dict:
    """A small archive of ``dataset`` under ``root``: the expected (train, test) images (NCHW uint8) and
    labels in torchvision's order."""
    cls = tvc.CIFAR10 if dataset == "cifar10" else tvc.CIFAR100
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    label_key = "labels" if dataset == "cifar10" else "fine_labels"
    classes = 10 if dataset == "cifar10" else 100
    out = {}
    for split, files, n in (("train", cls.train_list, per_batch), ("test", cls.test_list, test)):
        parts = [
            _batch(folder / name, n, 7 * k + len(split), label_key, classes)
            for k, (name, _) in enumerate(files)
        ]
        images = np.concatenate([d for d, _ in parts]).reshape(-1, 3, 32, 32)
        out[split] = (torch.from_numpy(images), torch.tensor([y for _, lab in parts for y in lab]))
    with open(folder / cls.meta["filename"], "wb") as f:
        pickle.dump({cls.meta["key"]: [f"class{i}" for i in range(classes)]}, f)
    return out


@pytest.fixture
def no_md5(monkeypatch):
    monkeypatch.setattr(tvc, "check_integrity", lambda *args, **kwargs: True)


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_archives_in_torchvision_format_load_exactly(tmp_path, no_md5, dataset):
    expected = make_archive(tmp_path, dataset)
    data = cdata.load_data(dataset, str(tmp_path), torch.device("cpu"))
    for split, got in (("train", data.train), ("test", data.test)):
        images, labels = expected[split]
        assert got.images.dtype == torch.uint8 and got.images.shape == images.shape
        assert torch.equal(got.images, images), split
        assert torch.equal(got.labels, labels), split
    assert data.num_classes == (10 if dataset == "cifar10" else 100)
    assert data.in_channels == 3
    assert data.info["train_total"] == len(expected["train"][1])


def test_a_corrupted_archive_says_what_to_do(tmp_path):
    make_archive(tmp_path, "cifar10")  # md5 not patched: torchvision rejects the small files
    with pytest.raises(cdata.DataError, match="not found \\(or corrupted\\)"):
        cdata.load_data("cifar10", str(tmp_path), torch.device("cpu"))


def test_the_command_trains_and_reports_on_a_cifar_archive(tmp_path, no_md5, capsys):
    make_archive(tmp_path / "data", "cifar10")
    runs = tmp_path / "runs"
    args = ["--model", "resnet8", "--dataset", "cifar10", "--data", str(tmp_path / "data"), "--epochs", "1"]
    args += ["--batch-size", "20", "--device", "cpu", "--val-split", "10", "--no-progress"]
    grid = [
        "--grid",
        "--optimizers",
        "sgdm",
        "--methods",
        "baseline,znorm",
        "--seeds",
        "0,1",
        "--out",
        str(runs),
    ]
    assert main(args + grid) == 0
    metrics = [json.loads(p.read_text().splitlines()[-1]) for p in sorted(runs.glob("*/metrics.jsonl"))]
    assert len(metrics) == 4 and all(m["epoch"] == 1 and 0 <= m["test_acc"] <= 1 for m in metrics)
    config = json.loads(next(runs.glob("*/config.json")).read_text())
    assert config["dataset"] == "cifar10" and config["_resolved"]["data"]["train_total"] == 60
    assert main(["--report", str(runs), "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "results.md").read_text()
    assert "| resnet8 | ZNorm |" in text and "| resnet8 | SGDM | ZNorm | 0, 1 |" in text
