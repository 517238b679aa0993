"""The package version, in a module of its own so that the package's modules (and setuptools, statically) read it
without importing the package."""

__version__ = "0.5.1"
