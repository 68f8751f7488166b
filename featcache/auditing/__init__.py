"""Auditing a dataset from its cache, with no second pass over the images: label issues
(confident learning on out-of-fold probabilities, :mod:`.labels`), exact and near duplicates,
train/test leaks, outliers and "images like this one" (:mod:`.neighbours`, :mod:`.similar`),
written as a page, JSON, CSV files and an exclude list that training commands accept (:mod:`.job`)."""
