"""The container images of the components: the names the image build (images/) and the Helm chart
use, tagged with the package version so a component spec always names the code it runs."""

from pe_triage import __version__

REGISTRY = "ghcr.io/pe-triage"
#: CPU runtime: every step but training
CPU_IMAGE = f"{REGISTRY}/pe-triage:{__version__}"
#: CUDA runtime: the training steps
CUDA_IMAGE = f"{REGISTRY}/pe-triage-cuda:{__version__}"
