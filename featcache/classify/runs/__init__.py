"""Run directories: the run kinds (registry), loading and writing a run, a run's images."""
