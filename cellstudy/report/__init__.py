"""Reporting: statistics, findings, the unseen-fields test, plots and figures, the book and its
browser check."""


def book_table_options() -> None:
    """pandas display options for the book's tables: no cell text cut to "..." (a convergence
    reason, an exclusion reason) and up to 300 rows shown whole (the paired comparisons: one row
    per network x metric x regime). Set when the package is imported, as the notebooks do."""
    import pandas as pd

    pd.set_option("display.max_colwidth", None)
    pd.set_option("display.max_rows", 300)
    pd.set_option("display.min_rows", 300)


book_table_options()
