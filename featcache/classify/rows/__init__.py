"""Rows of feature sets as training data: one set (in memory or streamed), or several matched image by image."""

# Train+validation features (float32) above this many MB stream from the store in chunks
# (train, compare, search; the --memory-budget default of each).
DEFAULT_MEMORY_BUDGET_MB = 2048.0
