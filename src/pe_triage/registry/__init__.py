"""The model registry on MLflow: with ``pe_triage.tracking``, the only code that imports mlflow (lazily,
inside functions or in ``pyfunc``), so the data and model steps stay free of it."""
