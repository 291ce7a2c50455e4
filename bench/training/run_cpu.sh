#!/usr/bin/env bash
# The CPU runs behind bench/training/RESULTS.md: Fashion-MNIST, ResNet-20, a seeded subset of the training
# set, a few epochs, one seed. Step 1 chooses learning rates on a held-out split of the TRAIN set (never the
# test set); step 2 trains the 8 runs (2 optimizers x 4 methods) with the chosen rates; step 3 reports.
# Usage: bench/training/run_cpu.sh sweep | final | report (LRS=<--lr spec> for final)     (outputs under runs/fmnist-*, gitignored)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="nice -n 10 .venv/bin/python -m znorm_kernels.cifar"
COMMON=(--dataset fashion-mnist --models resnet20 --optimizers sgdm,adam --methods baseline,gc,clip,znorm
        --seeds 0 --batch-size 128 --no-progress --device cpu --threads 1)
case "${1:-}" in
  sweep)
    # Two candidate rates per optimizer and method ("a" and "b"), 1 epoch, 2500 training examples,
    # 2000 held-out TRAIN examples for validation (the same for every run: fixed by the seed).
    $PY --grid "${COMMON[@]}" --epochs 1 --val-split 2000 --train-subset 2500 --test-subset 500 \
        --lr "sgdm=0.1,sgdm/clip=0.5,sgdm/znorm=0.01,adam=3e-3" --out runs/fmnist-sweep-a
    $PY --grid "${COMMON[@]}" --epochs 1 --val-split 2000 --train-subset 2500 --test-subset 500 \
        --lr "sgdm=0.02,sgdm/clip=0.1,sgdm/znorm=0.001,adam=1e-3" --out runs/fmnist-sweep-b
    # A third rate where the best of the two sat at the edge of the range (SGDM with ZNorm, with clipping).
    $PY --grid "${COMMON[@]}" --epochs 1 --val-split 2000 --train-subset 2500 --test-subset 500 \
        --optimizers sgdm --methods clip,znorm --lr "sgdm/clip=2.5,sgdm/znorm=1e-4" --out runs/fmnist-sweep-c
    ;;
  final)
    : "${LRS:?set LRS to the chosen --lr spec}"
    $PY --grid "${COMMON[@]}" --epochs 3 --train-subset 3000 --test-subset 2000 --lr "$LRS" \
        --out runs/fmnist-final
    ;;
  report)
    # The table goes into RESULTS.md by hand (with the notes); the figure is copied here.
    .venv/bin/python -m znorm_kernels.cifar.report runs/fmnist-final
    cp runs/fmnist-final/test_accuracy.png bench/training/test_accuracy.png
    ;;
  *) echo "usage: $0 sweep|final|report" >&2; exit 2 ;;
esac
