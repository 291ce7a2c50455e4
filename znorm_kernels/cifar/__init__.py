"""The bundled CIFAR experiment of the ZNorm papers.

``models`` (CIFAR ResNets 6n+2), ``data`` (device-resident datasets: CIFAR-10/100, Fashion-MNIST, fake),
``train`` (one run: config, loop, checkpoints, exact resume), ``grid`` (models x optimizers x methods x
seeds), ``report`` (paper-style table and figure), ``paired`` (each method against the baseline, seed by
seed), ``record`` (finished runs kept for the repository). The command line is
``python -m znorm_kernels.cifar``.
"""
