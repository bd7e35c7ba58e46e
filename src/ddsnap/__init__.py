"""ddsnap: a shared copy-on-write snapshot store for block volumes, served over NBD."""

__version__ = "0.3.0"
