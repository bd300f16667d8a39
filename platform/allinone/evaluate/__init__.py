"""Scoring restorations: metrics, tiling, test sets, the all-in-one / zero-shot / few-shot suites,
classical baselines, continual-learning metrics and grids."""
