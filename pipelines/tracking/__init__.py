"""Everything that talks to MLflow, through one client built from the config's tracking URI.

`store` (URI, health check, client, experiment, find a run by tag) <- `backlog` (metrics kept
through an outage) <- `runs` (a run's lifecycle, metrics, files, pictures) <- `registry` (package,
register, resolve, load the encoder), `sweeps` (a sweep's parent and trial runs), `probe_scores`.
No other module imports mlflow (tests/test_layering.py).
"""
