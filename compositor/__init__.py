"""directflip: a direct-flip compositor that puts guest framebuffers straight onto monitor planes."""

# The one place the version is written: pyproject.toml takes it from here (tool.setuptools.dynamic),
# and `directflip --version` prints it when the package is not installed.
__version__ = "0.1.0"
