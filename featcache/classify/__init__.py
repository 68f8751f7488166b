"""Stage two: classifier heads trained on cached features, evaluated, compared and used.

- :mod:`.heads`: the heads (``dense`` Keras, ``logreg`` scikit-learn), one interface
- :mod:`.data`: rows of a feature set, in memory or streamed from HDF5 within a budget
- :mod:`.harness`: ``train`` (one run, a run directory) and ``compare`` (a leaderboard)
- :mod:`.search`: ``search`` (Optuna over heads x feature sets x settings; :mod:`.study` keeps
  the study resumable and shareable, :mod:`.leaderboard` writes what it found)
- :mod:`.reports`: metrics, sanity flags, plots;  :mod:`.rundir`: the run directory
- :mod:`.predict` / :mod:`.export`: base + head on new images (or an exported model); exports
  (.keras, and through :mod:`.deploy_tflite` / :mod:`.deploy_savedmodel` TensorFlow Lite and
  SavedModel), each with its :mod:`.model_card`; :mod:`.deployed` runs exported files;
  :mod:`.run_images`: a run's images (calibration, test measurement, fine-tuning)
- :mod:`.report_html`: the HTML report of a run (data from :mod:`.report_data`, pictures from
  :mod:`.report_figures`); :mod:`.leaderboard_html`: leaderboard pages; :mod:`.html_page`: their page
- :mod:`.runs`: any run directory (head, fused, finetune, ensemble) as one object, and
  ``split_probabilities(run_dir, split)`` from the cache; :mod:`.align`: rows of several
  feature sets matched image by image; :mod:`.recipe`: rebuilding a feature set's base
- :mod:`.ensemble`: weighted averages of runs; :mod:`.finetune`: the transfer strategies

Imports are lazy: ``import featcache.classify`` loads neither Keras nor scikit-learn.
"""

# predict() and export() live in the submodules of the same names (featcache.classify.deploy.predict.predict).
__all__ = ["train", "compare", "search", "make_head", "HEADS"]


def __getattr__(name):
    if name in ("train", "compare"):
        from .train import harness

        return getattr(harness, name)
    if name == "search":
        from .search.search import search

        return search
    if name in ("make_head", "HEADS"):
        from .heads import registry as heads

        return getattr(heads, name)
    raise AttributeError(f"module 'featcache.classify' has no attribute {name!r}")
