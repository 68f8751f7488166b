"""The HDF5 feature store: layout, cache keys, append/resume, locking, damage checks and repair."""
from .damage import StoreDamaged
from .key import FORMAT_VERSION, KeySpec, feature_set_key
from .store import FeatureSet, Store, open_store
from .writer import StoreWriter

__all__ = ["FORMAT_VERSION", "KeySpec", "feature_set_key", "FeatureSet", "Store", "StoreDamaged", "StoreWriter",
           "open_store"]
