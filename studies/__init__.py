"""Method studies over lpe's trainer: tuned recipes, bracketed sweeps, paired seeds, result pages.

A tool beside the library, not part of it: it imports `lpe` and `lpe` never imports it, so a
training run loads none of its dependencies (scipy, matplotlib: `pip install "lpe[study]"`).
`launch.py` runs a study config (one with `grids`); `studies.study` holds the runs and the
ledger, `studies.page` writes the results page and its plots.
"""
