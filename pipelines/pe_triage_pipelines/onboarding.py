"""Onboarding: ingest a list of sites into the persistent slices store, one data-quality report per
site, each logged to MLflow as a dataset version.

``sites`` is a list of ``{"site": name, "source": DICOM folder or s3:// prefix, "labels": manifest
CSV or ""}``. With ``labels_format`` other than ``manifest`` (``rspect``, ``lidc``, ``masks``: a public
set's label files, ``pe-triage labels convert``) each site's labels are first converted beside
themselves to ``<labels>.manifest.csv``, which its ingest reads; for ``manifest`` that step passes
the labels through. Sites fan out with ``ParallelFor`` (at most ``parallel_sites`` at a time; different
sites may be ingested into one store concurrently). A site's drift is measured against whatever
other sites the store holds when its report runs.
"""


from kfp import dsl
from pe_triage_components import build

from pe_triage_pipelines.cluster import ClusterOptions, io_step

NAME = "pe-triage-onboarding"


def build_onboarding(options: ClusterOptions = ClusterOptions()):
    c = build(options.cpu_image, options.cuda_image)

    @dsl.pipeline(name=NAME, description="Ingest hospital sites into the slices store, with a data-quality report per site")
    def onboarding(sites: list, slices_store: str, config: str = "", tracking_uri: str = "", demo_key: bool = False,
                   labels_format: str = "manifest"):
        with dsl.ParallelFor(sites, parallelism=options.parallel_sites, name="sites") as site:
            labels = io_step(c.convert_labels(labels=site.labels, labels_format=labels_format, config=config), options,
                             cache=False)
            ingested = io_step(c.ingest(site=site.site, source=site.source, labels=labels.output, store=slices_store,
                                        config=config, demo_key=demo_key), options, cache=False, pseudonym_key=True)
            io_step(c.data_quality(slices=ingested.outputs["slices"], config=config, tracking_uri=tracking_uri), options,
                    cache=False)

    return onboarding


onboarding = build_onboarding()
