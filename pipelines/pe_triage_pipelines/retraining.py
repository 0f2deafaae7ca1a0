"""Retraining: the current slices store -> windows -> splits -> both stages trained in parallel ->
the operating point set on the validation exams -> evaluation -> registered as challenger -> promoted
to champion only if the gates pass, the champion being re-evaluated on the same test split first so
that "no regression" compares like with like. An exit handler records the run's outcome in MLflow
whether or not a step failed.

The store is imported (``dsl.importer``) under its URI; ``dataset_version`` (never cached) reads its
digest first, and the digest feeds the importer's metadata and ``preprocess``, so every step after
it is cached exactly as long as the data, the configuration and the code (image tag) are unchanged.
"""


from kfp import dsl
from kfp.dsl import Dataset
from pe_triage_components import build

from pe_triage_pipelines.cluster import ClusterOptions, gpu_step, io_step

NAME = "pe-triage-retraining"


def build_retraining(options: ClusterOptions = ClusterOptions()):
    c = build(options.cpu_image, options.cuda_image)

    @dsl.pipeline(name=NAME, description="Retrain both stages on the slices store, evaluate, register, promote if the gates pass")
    def retraining(slices_store: str, config: str = "", tracking_uri: str = "", actor: str = "kfp-retraining", truth: str = ""):
        outcome = io_step(c.record_outcome(pipeline=NAME, config=config, tracking_uri=tracking_uri), options, cache=False)
        with dsl.ExitHandler(outcome, name="retraining"):
            version = io_step(c.dataset_version(store=slices_store), options, cache=False)
            slices = dsl.importer(artifact_uri=slices_store, artifact_class=Dataset, reimport=False,
                                  metadata={"digest": version.output})
            windows = io_step(c.preprocess(slices=slices.output, slices_digest=version.output, config=config), options)
            splits = io_step(c.split(windows=windows.outputs["windows"], config=config), options)
            stages = {
                stage: gpu_step(c.train(windows=windows.outputs["windows"], splits=splits.outputs["splits"], stage=stage,
                                        config=config, tracking_uri=tracking_uri),
                                options).set_display_name(f"train stage {stage}")
                for stage in (1, 2)
            }
            calibrated = io_step(c.calibrate(stage1=stages[1].outputs["model"], stage2=stages[2].outputs["model"],
                                             windows=windows.outputs["windows"], splits=splits.outputs["splits"],
                                             config=config), options)
            models = {stage: calibrated.outputs[f"calibrated_stage{stage}"] for stage in (1, 2)}
            evaluated = io_step(c.evaluate(stage1=models[1], stage2=models[2],
                                           windows=windows.outputs["windows"], splits=splits.outputs["splits"], config=config,
                                           tracking_uri=tracking_uri, truth=truth), options)
            registered = io_step(c.register(stage1=models[1], stage2=models[2],
                                            evaluation=evaluated.outputs["evaluation"], config=config, tracking_uri=tracking_uri,
                                            actor=actor), options)
            gates = c.check_gates(evaluation=evaluated.outputs["evaluation"], config=config).after(registered)
            with dsl.If(gates.output == True, name="gates-passed"):  # noqa: E712 (builds a KFP condition, not a bool)
                champion = io_step(c.evaluate_champion(windows=windows.outputs["windows"], splits=splits.outputs["splits"],
                                                       config=config, tracking_uri=tracking_uri), options, cache=False)
                io_step(c.promote(version=registered.outputs["version"], champion_evaluation=champion.outputs["evaluation"],
                                  config=config, tracking_uri=tracking_uri, actor=actor), options, cache=False)

    return retraining


retraining = build_retraining()
