"""``python -m znorm_kernels``: print a diagnosis of this installation (see ``znorm_kernels.info``)."""

from znorm_kernels.info import main

if __name__ == "__main__":
    raise SystemExit(main())
