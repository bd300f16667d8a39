"""MLflow: runs, the model registry, resolving what a user calls a model, and the HTML report."""
