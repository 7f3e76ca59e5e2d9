# The cffi extension (compositor._native) is declared here because setuptools reads cffi_modules only
# from setup(); everything else lives in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["native/build.py:ffibuilder"])
