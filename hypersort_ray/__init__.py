"""hypersort-ray: HyperSORT (MICCAI 2025) as a Ray-distributed experiment service."""

__version__ = "0.1.0"
