"""The composite model as MLflow "models from code": this file is what a version records instead of a
pickle. MLflow runs it to get the model object; the class comes from the installed package and the
weights are the version's artifacts, read with ``torch.load(weights_only=True)``.

pe-triage's own loaders (``load_registered``) never run this file: they check every artifact's
digest and build the model from the artifacts directly."""

from mlflow.models import set_model

from pe_triage.registry.pyfunc import PeTriageModel

set_model(PeTriageModel())
