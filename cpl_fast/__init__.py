"""cpl_fast: fast Contrastive Prompt Learning for all-in-one image restoration."""
__version__ = "0.1.0"
