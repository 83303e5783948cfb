"""nanprobe: find numerical noise inside convolutional networks and turn it into speed."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("nanprobe")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
