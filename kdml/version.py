"""The kdml version, read by setup.cfg and stamped into exported models."""

__version__ = "0.1.0"
