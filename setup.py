"""Build script: the Python package, plus the native extension (csrc/) once it exists.

Install for development with `pip install --no-build-isolation -e .` (the Makefile does this), so the
extension compiles against the torch already installed.
"""

from setuptools import setup

setup()
