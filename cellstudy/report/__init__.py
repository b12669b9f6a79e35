"""Reporting: statistics, findings, the unseen-fields test, plots and figures, the book and its
browser check."""


def book_table_options() -> None:
    """Set pandas' display options for the book's tables: no cell text cut to "..." (a
    convergence reason, an exclusion reason) and up to 300 rows shown whole (the paired
    comparisons: one row per network x metric x regime). Each notebook of the study calls it in
    its import cell; importing ``cellstudy`` leaves a user's pandas options as they are."""
    import pandas as pd

    pd.set_option("display.max_colwidth", None)
    pd.set_option("display.max_rows", 300)
    pd.set_option("display.min_rows", 300)
