"""How a model is judged: metrics in vol points beside persistence, the baseline and SSVI; per-date and per-bucket
errors; a Diebold-Mariano test; arbitrage counts of predicted surfaces; plots; walk-forward folds; the AutoML
leaderboard and ensembles. Training, sweeps and AutoML call it; it imports no entry point."""
