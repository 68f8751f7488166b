"""HTML pages (run report, leaderboards) and the figures they inline."""
