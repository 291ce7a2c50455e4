"""The bundled CIFAR experiment of the ZNorm papers: models (``models``), and the training script."""
