"""Classifier heads on cached features: the registry (dense Keras, logreg scikit-learn), one interface."""
