"""Retraining: the current slices store -> windows -> splits -> both stages trained in parallel ->
the operating point set on the validation exams -> the exam-level model over the calibrated pair
(``exam.enabled``) -> evaluation, rules beside the exam model -> registered as challenger -> promoted
to champion only if the gates pass, the champion being re-evaluated on the same test split first so
that "no regression" compares like with like. An exit handler records the run's outcome in MLflow
whether or not a step failed.

The store is imported (``dsl.importer``) under its URI; ``dataset_version`` (never cached) reads its
digest first, and ``check_trigger`` decides whether anything warrants training (new labelled data
since the champion's slices digest, drift in the monitoring records, no champion, or ``force``): when
nothing does, the run records "skipped: nothing new" with the reason and trains nothing. The digest
feeds the importer's metadata and ``preprocess``, so every step after it is cached exactly as long as
the data, the configuration and the code (image tag) are unchanged.
On a cluster with a data root (``ClusterOptions.data_root``) nothing is imported: ``preprocess_store``
takes the store's URI and digest and updates the persistent windows store in place (only new series),
and the steps after it follow the windows' reference to that store.
"""


from typing import Any

from kfp import dsl
from kfp.dsl import Dataset, PipelineTask
from pe_triage_components import Components, build

from pe_triage_pipelines.cluster import ClusterOptions, evaluate_step, gpu_step, io_step

NAME = "pe-triage-retraining"


def build_retraining(options: ClusterOptions = ClusterOptions()):
    c = build(options.cpu_image, options.cuda_image)
    ev = build(options.cuda_image, options.cuda_image) if options.evaluate_gpu else c  # evaluation on the CUDA image

    @dsl.pipeline(name=NAME, description="Retrain both stages on the slices store, evaluate, register, promote if the gates pass")
    def retraining(slices_store: str, config: str = "", tracking_uri: str = "", actor: str = "kfp-retraining", truth: str = "",
                   force: bool = False):
        job = dsl.PIPELINE_JOB_ID_PLACEHOLDER  # links the trigger's decision to the outcome run
        outcome = io_step(c.record_outcome(pipeline=NAME, config=config, tracking_uri=tracking_uri, job=job), options,
                          cache=False)
        with dsl.ExitHandler(outcome, name="retraining"):
            version = io_step(c.dataset_version(store=slices_store), options, cache=False)
            trigger = io_step(c.check_trigger(store=slices_store, slices_digest=version.output, force=force, config=config,
                                              tracking_uri=tracking_uri, job=job), options, cache=False)
            with dsl.If(trigger.output == True, name="retrain-warranted"):  # noqa: E712 (builds a KFP condition)
                _retrain(c, ev, options, slices_store, version.output, config, tracking_uri, actor, truth)

    return retraining


def _retrain(c: Components, ev: Components, options: ClusterOptions, slices_store: str, digest: Any, config: str,
             tracking_uri: str, actor: str, truth: str) -> None:
    """The steps from the store's windows to a promoted champion (inside the exit handler)."""
    windows = io_step(_windows(c, options, slices_store, digest, config), options)
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
    # always runs: with exam.enabled false (config is a run-time parameter) it writes a "disabled" marker at once
    exam = evaluate_step(ev.train_exam(stage1=models[1], stage2=models[2], windows=windows.outputs["windows"],
                                       splits=splits.outputs["splits"], config=config, tracking_uri=tracking_uri),
                         options).set_display_name("train exam model").outputs["exam"]
    evaluated = evaluate_step(ev.evaluate(stage1=models[1], stage2=models[2],
                                          windows=windows.outputs["windows"], splits=splits.outputs["splits"],
                                          config=config, tracking_uri=tracking_uri, truth=truth, exam=exam), options)
    loso = _leave_one_site_out(c, options, windows, evaluated, config, tracking_uri)
    registered = io_step(c.register(stage1=models[1], stage2=models[2],
                                    evaluation=evaluated.outputs["evaluation"], config=config, tracking_uri=tracking_uri,
                                    actor=actor, loso=loso.outputs["loso"], exam=exam), options)
    gates = c.check_gates(evaluation=evaluated.outputs["evaluation"], config=config,
                          loso=loso.outputs["loso"]).after(registered)
    with dsl.If(gates.output == True, name="gates-passed"):  # noqa: E712 (builds a KFP condition, not a bool)
        champion = evaluate_step(ev.evaluate_champion(windows=windows.outputs["windows"], splits=splits.outputs["splits"],
                                                      config=config, tracking_uri=tracking_uri), options, cache=False)
        io_step(c.promote(version=registered.outputs["version"], champion_evaluation=champion.outputs["evaluation"],
                          config=config, tracking_uri=tracking_uri, actor=actor), options, cache=False)


def _leave_one_site_out(c: Components, options: ClusterOptions, windows: PipelineTask, evaluated: PipelineTask,
                        config: str, tracking_uri: str) -> PipelineTask:
    """One fold per site (none when ``loso`` is off or there are too few sites: the summary records
    why), each trained like the main pair on a GPU node and evaluated on its held-out site, then the
    summary against the main pair's pooled test evaluation, which the gates read."""
    folds = io_step(c.loso_folds(windows=windows.outputs["windows"], config=config), options)
    with dsl.ParallelFor(folds.outputs["Output"], parallelism=options.parallel_folds, name="site-folds") as fold:
        trained = gpu_step(c.loso_fold(windows=windows.outputs["windows"], site_splits=folds.outputs["site_splits"],
                                       fold=fold, config=config, tracking_uri=tracking_uri), options)
    return io_step(c.loso_summary(evaluations=dsl.Collected(trained.outputs["evaluation"]),
                                  pooled=evaluated.outputs["evaluation"], site_splits=folds.outputs["site_splits"],
                                  config=config, tracking_uri=tracking_uri), options)


def _windows(c: Components, options: ClusterOptions, slices_store: str, digest: Any, config: str) -> PipelineTask:
    """The windows of the slices store at ``digest``: by reference into the persistent store under the
    cluster's data root, or, without one (kfp.local), preprocessed from the imported store into a run artifact."""
    if options.data_root:
        return c.preprocess_store(slices_store=slices_store, slices_digest=digest, config=config, windows_root=options.data_root)
    slices = dsl.importer(artifact_uri=slices_store, artifact_class=Dataset, reimport=False, metadata={"digest": digest})
    return c.preprocess(slices=slices.output, slices_digest=digest, config=config)


retraining = build_retraining()
