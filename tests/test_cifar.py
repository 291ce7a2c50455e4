"""The bundled training script (znorm_kernels.cifar): every method and optimizer trains, learning happens,
resume is bit for bit, the report renders, bad input gets clear messages, the idx reader reads idx files.

Everything runs on the CPU with the ``fake`` dataset, ResNet-8 and 8x8 images, so the file takes seconds.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from znorm_kernels.cifar import data as cdata
from znorm_kernels.cifar.__main__ import main
from znorm_kernels.cifar.build import build_model
from znorm_kernels.cifar.checkpoint import load_checkpoint
from znorm_kernels.cifar.config import Config, UsageError
from znorm_kernels.cifar.grid import parse_lr, run_grid
from znorm_kernels.cifar.report import find_runs, markdown_table
from znorm_kernels.cifar.report import main as report_main
from znorm_kernels.cifar.train import train

TINY = Config(
    model="resnet8",
    dataset="fake",
    fake_train=96,
    fake_test=32,
    fake_size=8,
    batch_size=32,
    epochs=1,
    device="cpu",
)
TIMING = {"seconds", "treatment_seconds", "eval_seconds"}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run far faster on one thread, above all on a busy machine; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def quiet(*_: object) -> None:
    pass


def run(cfg: Config, out, **kw) -> list[dict]:
    return train(cfg, out, progress=False, log=quiet, **kw)


def without_timings(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in TIMING} for m in metrics]


@pytest.mark.parametrize("optimizer", ["sgdm", "adam"])
@pytest.mark.parametrize("method", ["baseline", "gc", "clip", "znorm"])
def test_each_method_and_optimizer_trains_an_epoch(tmp_path, optimizer, method):
    cfg = replace(TINY, optimizer=optimizer, method=method, lr=0.01 if optimizer == "sgdm" else 1e-3)
    metrics = run(cfg, tmp_path)
    assert len(metrics) == 1 and torch.get_num_threads() == 1
    m = metrics[0]
    assert np.isfinite(m["train_loss"]) and np.isfinite(m["test_loss"])
    assert (m["treatment_seconds"] > 0) == (method != "baseline")
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "curves.png"):
        assert (tmp_path / name).is_file()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["method"] == method
    assert (saved["_resolved"]["znorm_backend"] is not None) == (method == "znorm")
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1]


def test_the_treatment_changes_the_update(tmp_path):
    """The hook is really installed: after one step, each method's weights differ from the baseline's."""
    cfg = replace(TINY, fake_train=32, lr=0.01)
    weights = {}
    for method in ("baseline", "gc", "clip", "znorm"):
        run(replace(cfg, method=method), tmp_path / method)
        weights[method] = load_checkpoint(tmp_path / method / "checkpoint.pt")["model"]["conv1.weight"]
    for method in ("gc", "clip", "znorm"):
        assert not torch.equal(weights[method], weights["baseline"]), method


def test_loss_decreases_on_learnable_data(tmp_path):
    cfg = replace(TINY, fake_train=256, epochs=4, optimizer="adam", method="znorm", lr=3e-3)
    metrics = run(cfg, tmp_path)
    losses = [m["train_loss"] for m in metrics]
    assert losses[-1] < 0.7 * losses[0], losses
    assert metrics[-1]["train_acc"] > 0.3  # chance is 0.1


def test_resume_equals_an_uninterrupted_run_bit_for_bit(tmp_path):
    cfg = replace(TINY, epochs=3, lr_schedule="cosine", augment=True, method="znorm", val_split=16, lr=0.02)
    full = run(cfg, tmp_path / "full")
    part = run(cfg, tmp_path / "part", stop_after=1)
    assert len(part) == 1
    with pytest.raises(UsageError, match="--resume"):
        run(cfg, tmp_path / "part")
    resumed = run(cfg, tmp_path / "part", resume=True)
    assert without_timings(resumed) == without_timings(full)
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "part" / "checkpoint.pt")
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for pid, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][pid][key]), (pid, key)
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    lines = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


def test_resume_of_a_finished_run_does_nothing(tmp_path):
    first = run(TINY, tmp_path)
    assert run(TINY, tmp_path, resume=True) == first


def test_same_seed_same_initialization_and_batches_for_every_method():
    data = cdata.load_data("fake", None, torch.device("cpu"), fake_sizes=(64, 16, 8))
    a = build_model(replace(TINY, method="baseline"), data, torch.device("cpu"), False)
    torch.manual_seed(123)  # the global RNG must not matter
    b = build_model(replace(TINY, method="znorm", optimizer="adam"), data, torch.device("cpu"), False)
    c = build_model(replace(TINY, seed=1), data, torch.device("cpu"), False)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.conv1.weight, c.conv1.weight)

    def labels(seed, epoch):
        return [y.tolist() for _, y in cdata.epoch_batches(data.train, 16, seed, epoch, do_augment=True)]

    first = labels(0, 0)
    torch.manual_seed(7)
    assert labels(0, 0) == first
    assert labels(0, 1) != first
    assert labels(1, 0) != first


def test_last_partial_batch_dropped_or_kept():
    split = cdata.Split(torch.zeros(10, 1, 2, 2, dtype=torch.uint8), torch.arange(10))
    dropped = [y for _, y in cdata.epoch_batches(split, 4, 0, 0, drop_last=True)]
    kept = [y for _, y in cdata.epoch_batches(split, 4, 0, 0, drop_last=False)]
    assert [len(y) for y in dropped] == [4, 4]
    assert [len(y) for y in kept] == [4, 4, 2]
    assert sorted(torch.cat(kept).tolist()) == list(range(10))


def test_augment_is_a_padded_crop_or_its_mirror():
    images = torch.randint(0, 256, (6, 2, 5, 5), dtype=torch.uint8)
    out = cdata.augment(images, cdata.generator("augment", 0, 0), pad=2)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for i in range(6):
        windows = [padded[i, :, y : y + 5, x : x + 5] for y in range(5) for x in range(5)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1)) for w in windows)


def test_validation_split_is_fixed_by_the_seed_and_disjoint_from_train():
    def load(seed):
        return cdata.load_data(
            "fake", None, torch.device("cpu"), seed=seed, val_split=0.25, fake_sizes=(64, 8, 4)
        )

    d = load(0)
    assert len(d.val) == 16 and len(d.train) == 48
    train_rows = {tuple(x.flatten().tolist()) for x in d.train.images}
    assert not any(tuple(x.flatten().tolist()) in train_rows for x in d.val.images)
    assert torch.equal(load(0).val.images, d.val.images)


def fake_run(folder, optimizer, method, seed, accs):
    """A run folder as train() leaves it (config.json, metrics.jsonl), without training."""
    folder.mkdir(parents=True)
    cfg = replace(TINY, optimizer=optimizer, method=method, seed=seed, epochs=len(accs))
    (folder / "config.json").write_text(json.dumps(cfg.__dict__))
    rows = [{"epoch": i + 1, "train_loss": 1.0 / (i + 1), "test_acc": a} for i, a in enumerate(accs)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_renders_markdown_and_png(tmp_path, capsys):
    runs = tmp_path / "runs"
    fake_run(runs / "a", "sgdm", "baseline", 0, [0.5, 0.7, 0.6])
    fake_run(runs / "b", "sgdm", "baseline", 1, [0.5, 0.8, 0.7])
    fake_run(runs / "c", "adam", "znorm", 0, [0.6, 0.9, 0.9])
    fake_run(runs / "d", "sgdm", "znorm", 0, [0.1, 0.2, 0.3])
    (runs / "not-a-run").mkdir()
    table = markdown_table(find_runs([runs]))
    rows = [line for line in table.splitlines() if line.startswith("| resnet8")]
    assert rows == [
        "| resnet8 | baseline | 75.00 ± 7.07 | 65.00 ± 7.07 | 0.3333 ± 0.0000 |  |  |  |",
        "| resnet8 | ZNorm | 30.00 | 30.00 | 0.3333 | 90.00 | 90.00 | 0.3333 |",
    ]
    assert "SGDM best test acc %" in table and "Adam final train loss" in table
    assert main(["--report", str(runs), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "test_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    written = (tmp_path / "rep" / "results.md").read_text()
    assert written.startswith(table)
    # SGDM ZNorm and the SGDM baseline share seed 0: the paired section compares them (30% - 60%).
    assert "## Against the baseline, seed by seed" in written
    assert "| resnet8 | SGDM | ZNorm | 0 | -30.00 |  | one seed: none | -30.00 |" in written
    assert report_main([str(tmp_path / "nothing")]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_curves_png(tmp_path):
    metrics = run(replace(TINY, val_split=16), tmp_path)
    assert "val_acc" in metrics[0]
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_grid_skips_finished_runs_and_resumes_unfinished(tmp_path):
    logs: list[str] = []
    kwargs = dict(
        models=["resnet8"],
        optimizers=["sgdm"],
        methods=["baseline", "clip"],
        seeds=[0],
        lr=parse_lr("0.01,clip=0.1"),
        progress=False,
        log=logs.append,
    )
    base = replace(TINY, fake_train=32, epochs=2)
    train(
        replace(base, method="clip", lr=0.1),
        tmp_path / "resnet8-sgdm-clip-seed0",
        stop_after=1,
        progress=False,
        log=quiet,
    )
    paths = run_grid(base, tmp_path, **kwargs)
    assert [p.name for p in paths] == ["resnet8-sgdm-baseline-seed0", "resnet8-sgdm-clip-seed0"]
    assert any("clip-seed0: resuming" in line for line in logs)
    assert json.loads((paths[1] / "config.json").read_text())["lr"] == 0.1
    logs.clear()
    run_grid(base, tmp_path, **kwargs)
    assert sum("skipped" in line for line in logs) == 2


def test_lr_spec():
    spec = parse_lr("0.05,adam=1e-3,sgdm/znorm=0.01,clip=0.2")
    assert spec.lookup("sgdm", "znorm") == 0.01
    assert spec.lookup("sgdm", "clip") == 0.2
    assert spec.lookup("adam", "gc") == 1e-3
    assert spec.lookup("sgdm", "gc") == 0.05
    assert parse_lr(None).lookup("adam", "gc") is None
    for bad in ("rmsprop=0.1", "sgdm=fast", "adam/sgdm=1"):
        with pytest.raises(UsageError, match="--lr"):
            parse_lr(bad)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "resnet18"], "unknown model 'resnet18'"),
        (["--model", "vgg16"], "unknown model 'vgg16'"),
        (["--dataset", "fashion-mnist", "--data", "/nonexistent/fm"], "does not exist"),
        (["--znorm-backend", "nope", "--method", "znorm"], "unknown --znorm-backend"),
        (["--znorm-backend", "cuda", "--method", "znorm", "--device", "cpu"], "--znorm-backend cuda: "),
        (["--epochs", "0"], "--epochs must be > 0"),
        (["--val-split", "2"], "--val-split must be a count in 1..1"),
        (["--grid", "--seeds", "0,x"], "--seeds must be comma-separated integers"),
        (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "nope"], "--device"),
    ],
)
def test_bad_input_gets_a_clear_message(tmp_path, capsys, argv, message):
    tiny = [
        "--dataset",
        "fake",
        "--model",
        "resnet8",
        "--fake-train",
        "2",
        "--fake-test",
        "2",
        "--fake-size",
        "4",
        "--batch-size",
        "1",
        "--epochs",
        "1",
        "--no-progress",
        "--out",
        str(tmp_path / "r"),
    ]
    assert main(tiny + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_resume_with_another_configuration_is_refused(tmp_path, capsys):
    argv = [
        "--dataset",
        "fake",
        "--model",
        "resnet8",
        "--fake-train",
        "32",
        "--fake-test",
        "8",
        "--fake-size",
        "8",
        "--batch-size",
        "16",
        "--epochs",
        "2",
        "--stop-after",
        "1",
        "--no-progress",
        "--out",
        str(tmp_path),
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    assert main([*argv, "--resume", "--method", "znorm"]) == 2
    err = capsys.readouterr().err
    assert "another configuration" in err and "method: checkpoint 'baseline', requested 'znorm'" in err
    assert main([*argv, "--resume"]) == 0
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 2


@pytest.mark.parametrize("compress", [False, True])
def test_idx_reader_and_fashion_loader(tmp_path, compress):
    rng = np.random.default_rng(0)
    train_x = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    train_y = np.array([0, 1, 2, 9, 4], dtype=np.uint8)
    test_x = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    test_y = np.array([3, 3, 7], dtype=np.uint8)
    suffix = ".gz" if compress else ""
    for stem, arr in (
        ("train-images-idx3-ubyte", train_x),
        ("train-labels-idx1-ubyte", train_y),
        ("t10k-images-idx3-ubyte", test_x),
        ("t10k-labels-idx1-ubyte", test_y),
    ):
        cdata.write_idx(tmp_path / (stem + suffix), arr, compress=compress)
    assert np.array_equal(cdata.read_idx(tmp_path / ("train-images-idx3-ubyte" + suffix)), train_x)
    d = cdata.load_data("fashion-mnist", str(tmp_path), torch.device("cpu"))
    assert d.in_channels == 1 and d.num_classes == 10
    assert d.train.images.shape == (5, 1, 32, 32) and d.test.images.shape == (3, 1, 32, 32)
    assert torch.equal(d.train.images[:, 0, 2:30, 2:30], torch.from_numpy(train_x))
    assert d.train.images[:, :, :2].sum() == 0  # zero border
    assert d.test.labels.tolist() == [3, 3, 7]


def test_idx_reader_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x00\x00\x07\x01\x00\x00\x00\x02ab")
    with pytest.raises(cdata.DataError, match="not an idx file"):
        cdata.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05ab")
    with pytest.raises(cdata.DataError, match="file holds 2"):
        cdata.read_idx(tmp_path / "short")
    with pytest.raises(cdata.DataError, match="train-images-idx3-ubyte"):
        cdata.load_data("fashion-mnist", str(tmp_path), torch.device("cpu"))


def test_amp_fp16_with_a_fused_optimizer_matches_the_unfused_one(tmp_path):
    """GradScaler leaves a fused optimizer's gradients scaled; the ZNorm hook keeps the update the same."""
    cfg = replace(TINY, amp="fp16", method="znorm", lr=0.01, epochs=2)
    plain = run(cfg, tmp_path / "plain")
    fused = run(replace(cfg, fused=True), tmp_path / "fused")
    assert without_timings(plain)[0]["train_loss"] == pytest.approx(without_timings(fused)[0]["train_loss"])
    a = load_checkpoint(tmp_path / "plain" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "fused" / "checkpoint.pt")["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    assert np.isfinite(run(replace(cfg, amp="bf16"), tmp_path / "bf16")[-1]["train_loss"])


def test_missing_cifar_says_how_to_get_it(tmp_path):
    with pytest.raises(cdata.DataError, match="pass --download"):
        cdata.load_data("cifar10", str(tmp_path), torch.device("cpu"))


def test_an_interrupted_epoch_is_all_that_is_lost(tmp_path, monkeypatch):
    """Killed in the middle of epoch 2: the checkpoint holds epoch 1, and --resume ends where a run that was
    never interrupted ends."""
    import znorm_kernels.cifar.train as ctrain

    cfg = replace(TINY, epochs=2, method="clip", lr=0.1)
    full = run(cfg, tmp_path / "full")
    original = ctrain.epoch_batches

    def interrupted(split, batch_size, seed, epoch, **kw):
        for i, batch in enumerate(original(split, batch_size, seed, epoch, **kw)):
            if epoch == 1 and i == 1:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(ctrain, "epoch_batches", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "cut")
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["epoch"] == 1
    assert len((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()) == 1
    monkeypatch.setattr(ctrain, "epoch_batches", original)
    assert without_timings(run(cfg, tmp_path / "cut", resume=True)) == without_timings(full)
    assert not list((tmp_path / "cut").glob("*.tmp"))


@pytest.mark.parametrize("optimizer", ["sgdm", "adam"])
def test_znorm_optimizer_trains_like_the_hook_and_logs_gradient_statistics(tmp_path, optimizer):
    # Small steps: at lr 0.01 the fake data is learned within the second epoch and a ReLU flipped by a
    # rounding difference makes any two correct implementations part by 1e-4.
    cfg = replace(TINY, optimizer=optimizer, method="znorm", lr=1e-3, epochs=2)
    hook = run(cfg, tmp_path / "hook")
    fused = run(replace(cfg, znorm_optimizer=True), tmp_path / "fused")
    a = load_checkpoint(tmp_path / "hook" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "fused" / "checkpoint.pt")["model"]
    for name in a:  # the fused update rounds each operation where torch's kernels fuse multiply-adds
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-5, msg=name)
    for m in hook + fused:
        assert 0 < m["grad_std_min"] <= m["grad_std_median"] <= m["grad_std_max"]
        assert np.isfinite(m["grad_mean_absmax"])
    assert fused[0]["treatment_seconds"] == 0, "inside the step: not timed apart"
    configs = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("hook", "fused")]
    names = {c["_resolved"]["treatment"] for c in configs}
    torch_name = {"sgdm": "SGD", "adam": "Adam"}[optimizer]
    assert names == {f"register(torch.optim.{torch_name})", f"znorm_kernels.optim.ZNorm{torch_name}"}
