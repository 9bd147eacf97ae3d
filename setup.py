"""Plain setuptools entry point; the metadata lives in pyproject.toml.

The optional compiled C++/CUDA extension (sources under kernels/) will be wired in here.
"""
from setuptools import setup

setup()
