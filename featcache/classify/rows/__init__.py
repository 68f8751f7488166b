"""Rows of feature sets as training data: one set (in memory or streamed), or several matched image by image."""
