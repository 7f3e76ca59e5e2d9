"""directflip: a direct-flip compositor that puts guest framebuffers straight onto monitor planes."""

__version__ = "0.1.0"
