"""ZeroLLM package metadata lives in setup.cfg; this file exists for `pip install -e .`."""

from setuptools import setup

setup()
