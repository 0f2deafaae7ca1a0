"""MLflow tracking and the model registry: the only package that imports mlflow (lazily, inside functions or
in ``pyfunc``), so the data steps stay free of it."""
