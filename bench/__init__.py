"""Benchmarks of znorm_kernels against the PyTorch alternatives (``python -m bench``; ``make bench``)."""
