"""featcache's version, in a module of its own: what records it (stores, run directories, cards,
pages) imports it from here, so nothing imports the package root back."""
__version__ = "0.1.0"
