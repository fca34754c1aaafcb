"""moe-env: Mixture-of-Experts expert offloading with learned cache and prefetch policies."""

__version__ = "0.1.0"
