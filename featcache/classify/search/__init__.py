"""Hyperparameter search (Optuna) over heads, feature sets and settings, and its leaderboard."""
