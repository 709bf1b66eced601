"""The package version, on the ground floor so every stage may read it without importing the package face."""

__version__ = "0.1.0"
