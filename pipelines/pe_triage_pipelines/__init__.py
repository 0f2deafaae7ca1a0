"""The pe-triage pipelines (KFP v2): onboarding of sites and retraining, with their compile, local
run, submit and schedule helpers. The only package of the project, with ``pe_triage_components``,
that imports kfp."""
