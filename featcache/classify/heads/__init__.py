"""Classifier heads on cached features, one interface (:mod:`.base`), one registry
(:mod:`.registry`): ``dense`` (Keras, :mod:`.dense`) and ``logreg`` (scikit-learn, :mod:`.logreg`)."""
