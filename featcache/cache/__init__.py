"""The HDF5 feature store: layout, cache keys, append/resume, locking."""
from .key import FORMAT_VERSION, KeySpec, feature_set_key
from .store import FeatureSet, Store, StoreWriter, open_store

__all__ = ["FORMAT_VERSION", "KeySpec", "feature_set_key", "FeatureSet", "Store", "StoreWriter", "open_store"]
