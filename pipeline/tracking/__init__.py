"""MLflow: run lifecycle and logger (`runs`), the upload queue (`uploads`), the run summary (`summary`), the
model registry (`registry`). Nothing else in the package talks to MLflow."""
