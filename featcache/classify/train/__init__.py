"""Training jobs: train/compare/cross-validation, fine-tuning (the transfer strategies), ensembles."""
