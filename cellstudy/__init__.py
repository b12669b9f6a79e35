"""cellstudy: an open, reproducible, explainable deep-learning study of single-cell
fluorescence microscopy (after Mamalakis et al., arXiv:2309.00911)."""

__version__ = "0.1.0"
