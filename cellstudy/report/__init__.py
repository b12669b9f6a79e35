"""Reporting: statistics, findings, the unseen-fields test, plots and figures, the book and its
browser check."""
