"""Configuration: frozen dataclasses with the study's values as documented defaults, loaded from YAML.

Every step reads its section of one :class:`Config`; a YAML file only needs the keys it changes.
Unknown keys are an error (a typo must not silently fall back to a default), and so is a value
outside a field's ``Literal`` choices: from YAML the message names the key path, and a section
built in Python checks its choices too (:class:`_Choices`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")

#: the string choices of the sections below, written once: code that needs the list reads it with
#: ``typing.get_args`` (e.g. ``evaluation.metrics.RULES``)
LesionPresetName = Literal["realistic", "conspicuous"]
CropMode = Literal["dynamic", "series", "fixed"]
Fusion = Literal["branches", "shared", "stacked"]
Pooling = Literal["avg", "max", "avgmax"]
Imbalance = Literal["sampler", "weight", "none"]
Device = Literal["auto", "cpu", "cuda"]
PatientRule = Literal["any", "k_consecutive", "top_k_mean"]
#: ``EvalConfig.patient_rule``: a rule over the slice scores, or "exam": the exam-level model of the
#: model version decides each study (``predict.Triage``; a version without one is refused at load)
StudyRule = Literal[PatientRule, "exam"]
#: "exclude", or one of the cascade's classes (``schema.Label``: wnl, other, pe)
IndeterminateMode = Literal["exclude", "wnl", "other", "pe"]
AttributionMethod = Literal["integrated_gradients", "gradcam"]
OperatingLevel = Literal["patient", "slice"]
ExamArch = Literal["gru", "attention"]
#: what the exam model reads per slice: both stages' pooled features and logits, or a part (an ablation)
ExamFeatures = Literal["all", "embeddings", "logits"]


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message names the key."""


def _check_choice(tp: Any, value: Any, where: str) -> None:
    """``value`` must be one of the ``Literal`` ``tp``'s values (of the same type: ``True`` is not ``1``)."""
    allowed = typing.get_args(tp)
    if not any(value == a and type(value) is type(a) for a in allowed):
        raise ConfigError(f"{where}: {value!r} is not one of {list(allowed)}")


def _literal_fields(cls: type) -> dict[str, Any]:
    """The fields of ``cls`` typed ``Literal[...]`` (annotations are strings here: resolved first)."""
    return {name: tp for name, tp in typing.get_type_hints(cls).items() if typing.get_origin(tp) is Literal}


class _Choices:
    """Base of the sections with ``Literal`` fields: a section built in Python (or by
    ``dataclasses.replace``) with a value outside the choices fails at once, not in the step that
    reads it."""

    def __post_init__(self) -> None:
        for name, tp in _literal_fields(type(self)).items():
            _check_choice(tp, getattr(self, name), f"{type(self).__name__}.{name}")


@dataclass(frozen=True)
class LesionVisibility:
    """Smallest cross-section (mm², pixel count x pixel spacing², at native resolution) of each lesion
    kind on a slice that a radiologist would mark the slice for; thinner slivers of the lesion's edge
    are ``indeterminate``.

    Defaults: a reader calls a filling defect of about 2.5 mm across (segmental arteries are 3-7 mm
    wide, so smaller is partial volume of the wall or a mixing artefact): pi x 1.25² ~ 5 mm². A nodule
    is reported from about 3 mm diameter (smaller is a micronodule, indistinguishable from a vessel
    seen end-on): pi x 1.5² ~ 7 mm². A consolidation needs about 5.5 mm (~25 mm²) to differ from a
    vessel or atelectatic strand; ground glass, 150-450 HU above lung instead of ~850, about 8 mm
    (~50 mm²). An effusion's top is a thin posterior crescent along the chest wall, long before it
    is thick: ~50 mm² (e.g. 1 mm x 5 cm), below which it is not called.
    """

    pe: float = 5.0
    consolidation: float = 25.0
    ggo: float = 50.0
    nodule: float = 7.0
    effusion: float = 50.0


@dataclass(frozen=True)
class SiteShift:
    """An acquisition shift at some of the cohort's sites, as a hospital brings when it changes
    scanner or protocol: a sharper reconstruction kernel (more noise, another kernel name) and a
    miscalibrated HU scale (water not at 0). Off by default; a leave-one-site-out run or a drift
    report on a cohort with a shifted site must flag that site (issue 23's must-show)."""

    #: site names (site-a, site-b, ...) that get the shift; empty: none
    sites: tuple[str, ...] = ()
    #: added to every HU inside the reconstruction circle: a calibration off by 100-200 HU is the
    #: size of a wrong RescaleIntercept convention's residue, and moves contrast blood out of the
    #: vascular window's middle
    hu_offset: float = 0.0
    #: multiplies the site's noise sigma: a sharp lung kernel (Siemens B70f, GE LUNG) has 2-4x the
    #: noise of the soft-tissue kernels the sites use by default
    noise_scale: float = 1.0
    #: ConvolutionKernel written instead of the site's own ("": keep it), so ingest and the drift
    #: report see the new convention in the headers
    kernel: str = ""

    def __post_init__(self) -> None:
        if self.noise_scale <= 0 or abs(self.hu_offset) > 1000:
            raise ConfigError(f"synth.site_shift: noise_scale must be > 0 and |hu_offset| <= 1000 HU, got "
                              f"{self.noise_scale} and {self.hu_offset}")


@dataclass(frozen=True)
class SynthConfig(_Choices):
    """Synthetic chest-CT cohort (CTPA-like) used by the demo and the tests.

    Defaults: 512 px axial slices as a clinical scanner writes them; class mix close to the study's
    cohort (53 patients, roughly a third each WNL / other disease / PE).
    """

    sites: int = 3
    patients_per_site: int = 10
    slices: int = 60
    size: int = 512
    seed: int = 0
    #: fractions of patients that are PE / other disease; the rest are WNL
    pe_fraction: float = 0.4
    other_fraction: float = 0.3
    #: PE filling defect spans this many consecutive slices (min, max), before thickness scaling
    pe_extent_slices: tuple[int, int] = (4, 12)
    #: PE patients who also have other disease (effusion, consolidation, ...): on CTPA a third to a
    #: half of PE exams show an effusion or an infarct. With few, "no lung lesion on the slice" alone
    #: tells PE from other disease, and stage 2 learns that shortcut instead of the clot
    pe_comorbid_fraction: float = 0.4
    #: write per-pixel tissue/lesion label maps next to the masks (tests check HU per tissue)
    write_tissue_maps: bool = True
    #: "realistic" (the mix a CTPA service sees, down to small segmental clots and 5 mm nodules) or
    #: "conspicuous" (central and lobar clots, large nodules and effusions, dense ground glass: a
    #: cohort a small model can learn from in minutes)
    lesions: LesionPresetName = "realistic"
    #: per lesion kind, the smallest cross-section that gets a slice its label (else indeterminate)
    min_visible_area_mm2: LesionVisibility = field(default_factory=LesionVisibility)
    #: an acquisition shift at some sites (a new kernel, an HU offset); none by default
    site_shift: SiteShift = field(default_factory=SiteShift)


@dataclass(frozen=True)
class IngestConfig:
    """DICOM → ``slices`` Parquet ingest.

    Codec and row-group size come from the measured figures in PERF-NOTES.md: zstd level 1 on a
    plain binary pixel column (no dictionary, no statistics) is the best write/read balance; row
    groups of a few tens of slices keep reader memory small and reads fast.
    """

    #: worker processes for header scan and decode, at most; 0 = one per CPU core
    workers: int = 0
    #: a run starts no more workers than it has this many files per worker: a spawned worker costs
    #: ~0.6 s of CPU to start (interpreter, pydicom, pyarrow, and pandas, which pyarrow imports),
    #: about 500 files of its work
    min_files_per_worker: int = 500
    row_group_slices: int = 32
    zstd_level: int = 1
    #: header scans handed to a worker at a time (amortises inter-process overhead)
    scan_chunk_files: int = 64
    #: HU written for pixel padding (outside the scanner's field of view): air
    padding_hu: int = -1000
    #: lower HU bound: below the physical minimum (air) only padding or fill values exist
    min_hu: int = -1024
    #: tolerance when comparing orientation cosines / spacings within a series
    geometry_tolerance: float = 1e-3
    #: a manifest row that matches no ingested slice fails the run (else: reported as mismatch)
    strict_labels: bool = False
    #: largest Rows / Columns a header may declare, checked before any pixel is decoded: CT is 512²
    #: (high-resolution reconstructions 1024² or 2048²); 4096² int32 bounds a decoded slice at 64 MiB,
    #: where a forged 65535² header would claim 8 GiB
    max_rows: int = 4096
    max_cols: int = 4096
    #: largest NumberOfFrames: one Enhanced CT scan holds at most a few thousand frames (multi-frame
    #: files are refused later anyway; this refuses absurd claims as what they are)
    max_frames: int = 4096
    #: largest BitsAllocated: CT stores 16 bits, and 32 is the most DICOM allows for greyscale
    max_bits_allocated: int = 32
    #: a step between neighbouring slices of a series that differs from the series' median step by
    #: more than this fraction of it (a missing slice, one off the grid) is a warning in the report;
    #: scanners round positions to ~0.001 mm, far inside 10 % of any slice step
    z_grid_tolerance: float = 0.1
    #: one ingest per site and dataset at a time: a second one waits this long for the first, logging
    #: who holds the lock, then fails naming it (0: refuse at once). Longer than ``lock_ttl_s``, so a
    #: run restarted after its predecessor was killed on another node outlives the dead lock
    lock_wait_s: float = 300.0
    #: an S3 lock not renewed for this long is a dead run's and is taken over; it is renewed every
    #: quarter of it (four renewals must fail in a row). A local lock needs none: the kernel drops it
    #: when its holder dies
    lock_ttl_s: float = 120.0


@dataclass(frozen=True)
class WindowConfig:
    """A window defined in configuration: an HU range (lo, hi) or a (level, width) pair."""

    name: str
    lo: float | None = None
    hi: float | None = None
    level: float | None = None
    width: float | None = None


@dataclass(frozen=True)
class CropConfig(_Choices):
    """Dynamic lung crop (the study's method); thresholds checked on the LIDC series and the
    synthetic cohort (every lung pixel kept, most outside air cut)."""

    #: dynamic (per slice, the study), series (one box per series, union over its slices), fixed (baseline)
    mode: CropMode = "dynamic"
    #: a pooled block whose mean HU is below this is lung or air
    lung_hu: float = -400.0
    #: mean HU of a lung region (pure air, ~-1000, is bowel gas or an airway)
    lung_mean_hu: tuple[float, float] = (-980.0, -500.0)
    #: smallest lung region kept
    min_lung_area_mm2: float = 150.0
    margin_mm: float = 10.0
    #: grow the box to a square so resizing keeps the aspect ratio (the study resized boxes as they were)
    square: bool = True
    #: fixed baseline: the study's centred 300x180 crop of a 400x400 image, as fractions
    fixed_height_fraction: float = 180 / 400
    fixed_width_fraction: float = 300 / 400


@dataclass(frozen=True)
class PreprocessConfig:
    """``slices`` -> ``windows``. Defaults: the study's vascular and mediastinal windows and the
    clinical lung window, 256 px output.

    The study's lung window as printed (-400..1500 HU, preset ``lung``) maps aerated lung (-900..-700)
    and ground glass (-700..-400) to black, so parenchymal disease other than consolidation is
    invisible in it; the clinical lung window (L-600/W1500: -1350..150 HU) shows both. ``lung`` stays
    available to replicate the study."""

    #: window names, in channel order: presets of ``pe_triage.windows.PRESETS`` or ``custom_windows``
    windows: tuple[str, ...] = ("vascular", "mediastinal", "clinical_lung")
    custom_windows: tuple[WindowConfig, ...] = ()
    size: int = 256
    crop: CropConfig = field(default_factory=CropConfig)
    #: smallest slice side accepted (smaller images are not diagnostic CT)
    min_image_size: int = 64
    #: worker processes at most (0: one per core); each row group of a series is a task, so one
    #: long series keeps them all busy
    workers: int = 0
    #: a run starts no more workers than it has this many slices per worker: a spawned worker costs
    #: ~0.5 s to start (interpreter, numpy, cv2, pyarrow), about 300 slices of its work, and the
    #: 261-slice LIDC series ran at 426 slices/s in-process but 158 with 2 workers
    min_slices_per_worker: int = 300
    row_group_slices: int = 64
    zstd_level: int = 1


@dataclass(frozen=True)
class SplitConfig:
    """Patient-level splits: the study's 5:3:2 train:val:test, stratified by site and patient class."""

    ratios: tuple[float, float, float] = (5.0, 3.0, 2.0)
    seed: int = 0


@dataclass(frozen=True)
class LosoConfig:
    """Leave-one-site-out in the retraining pipeline (``evaluation.loso``): one fold per site, each
    trained like the main model without that site and evaluated on it, to answer "does the model
    work at a hospital it was not trained on?" before a promotion (gate:
    ``registry.gates.max_site_auroc_drop``)."""

    #: on by default: a hospital onboarded next is the users' normal case, and the fold models are
    #: the only evidence of how a model does at an unseen site
    enabled: bool = True
    #: fewer sites, no folds: with 2 sites each fold trains on a single hospital, which measures that
    #: hospital's idiosyncrasies rather than generalisation (and costs a full retraining per site)
    min_sites: int = 3
    #: the figures whose drop (pooled test split minus held-out site) the gate bounds: the stages'
    #: slice AUROCs, because they are threshold-free (the operating point is set on the pooled
    #: validation exams, so a held-out site's sensitivity mixes a shifted score scale, which a site
    #: recalibration fixes, with lost discrimination, which it does not) and rest on every slice of
    #: the site, where a site's patient PE sensitivity moves in steps of 1/(its few PE patients)
    gate_metrics: tuple[str, ...] = ("slice_stage1_auroc", "slice_stage2_auroc")

    def __post_init__(self) -> None:
        if self.min_sites < 2 or not self.gate_metrics:
            raise ConfigError(f"loso: min_sites must be >= 2 and gate_metrics non-empty, got {self.min_sites} "
                              f"and {list(self.gate_metrics)}")


@dataclass(frozen=True)
class LoaderConfig:
    """Training data loader: augmentation and the window cache."""

    augment: bool = True
    #: random shift, as a fraction of the image side
    max_shift: float = 0.05
    #: random zoom in [1 - max_scale, 1 + max_scale]
    max_scale: float = 0.05
    #: random contrast/brightness change of the zero-centred input
    intensity_jitter: float = 0.05
    #: off by default: the chest is not left-right symmetric (heart, aortic arch)
    hflip: bool = False
    #: where the selected window stacks are materialised for random access (default: a temp folder)
    cache_dir: str | None = None


@dataclass(frozen=True)
class ModelConfig(_Choices):
    """The study's CBAMDRN (DRN-D-54 with CBAM on every residual block), one branch per window.
    ``width`` scales every layer's channels: 1.0 is the study's model (a GPU model: ~3 images/s on
    a 2-core CPU); small widths keep the same design for CPU tests and the demo."""

    arch: str = "cbam_drn_d_54"
    width: float = 1.0
    #: no level narrower than this (the reference's narrowest level has 16, so the full-width model
    #: is unchanged; at width 0.125 its first levels would have 2-4 filters and learn 2-3x slower)
    min_channels: int = 16
    #: "branches" (one per window, the study), "shared" (one branch for every window) or "stacked"
    #: (one branch, windows as input channels)
    fusion: Fusion = "branches"
    #: global pooling before the head: "avg" (the study's DRN head), "max" or "avgmax" (both,
    #: concatenated: max pooling keeps a one-cell finding that averaging dilutes; not yet shown
    #: to train better here, so the study's head stays the default)
    pooling: Pooling = "avg"
    #: one logit: P(disease) in stage 1, P(PE) in stage 2
    num_outputs: int = 1
    #: neighbouring slices on each side fed with each slice (2.5-D input, ``windows.neighbour_rows``):
    #: each window's branch takes ``2 * context + 1`` channels. 0 is the study's single-slice model
    context: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.context <= 8:
            raise ConfigError(f"model.context {self.context}: expected 0..8 neighbouring slices on each side")

    @property
    def slices_per_window(self) -> int:
        return 2 * self.context + 1


@dataclass(frozen=True)
class TrainConfig(_Choices):
    """One stage's training run. Defaults: DWL input (the study's best), AdamW + cosine schedule,
    early stopping on validation AUROC, threshold for 95% validation sensitivity."""

    #: window names fed to the model, in branch order (DWL = vascular + lung; see PreprocessConfig
    #: for why the lung branch uses the clinical lung window)
    windows: tuple[str, ...] = ("vascular", "clinical_lung")
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    #: linear warm-up before the cosine decay, in epochs
    warmup_epochs: float = 1.0
    #: stop after this many epochs without a better validation metric (0 = never)
    patience: int = 6
    #: class imbalance: "sampler" (balanced sampling), "weight" (positive-class loss weight) or "none"
    imbalance: Imbalance = "sampler"
    #: training samples per epoch (default: the training split's size)
    samples_per_epoch: int | None = None
    #: the stage's own threshold is the highest that keeps this validation slice sensitivity (a missed
    #: PE costs more than a false alarm); the triage runs at the pair ``calibrate`` sets per exam
    #: (``OperatingPointConfig``), this one only with ``operating_point.level: slice``
    target_sensitivity: float = 0.95
    seed: int = 0
    #: DataLoader worker processes (0 = load in the training process)
    num_workers: int = 2
    #: "auto" (CUDA when present), "cpu" or "cuda"
    device: Device = "auto"
    #: bf16 autocast on CUDA (ignored on CPU)
    amp: bool = True
    #: channels_last memory format on CUDA (CPU builds here crash on it in training)
    channels_last: bool = True
    #: time budget in minutes (None: none), checked after every batch: when it is spent the epoch ends
    #: there, is validated and checkpointed, and training stops; the demo uses it
    max_minutes: float | None = None
    #: torch intra-op threads (0: the CPUs this process may use, ``parallel.available_cpus``, divided by
    #: ``side_by_side``, at most ``OMP_NUM_THREADS`` when set). More threads than free cores make every
    #: step wait for a descheduled one: on 2 shared cores one thread ran a steady 58-60 img/s where two
    #: swung between 26 and 93
    threads: int = 0
    #: training steps sharing this machine's CPUs at the same time (a caller running both stages at
    #: once on one node sets 2); 1 by default, since the pipelines run each stage in a pod of its own
    #: and ``kfp.local`` runs them one after the other
    side_by_side: int = 1


@dataclass(frozen=True)
class EvalConfig(_Choices):
    """Evaluation: the study's per-patient rule (any positive slice) plus the alternatives."""

    #: "any" (the study), "k_consecutive" (k positive slices in a row), "top_k_mean", or "exam" (the
    #: exam-level model at its validation-chosen thresholds; prediction only: a slice evaluation needs
    #: a slice rule). "any" stays the default: it is the study's rule, replicated
    patient_rule: StudyRule = "any"
    k: int = 2
    #: bootstrap resamples of patients for AUROC confidence intervals
    bootstrap: int = 1000
    confidence: float = 0.95
    seed: int = 0
    #: indeterminate slices in the slice metrics: "exclude" (no one can say what the model should
    #: answer there) or "wnl" / "other" / "pe" to score them as that class (a sensitivity analysis);
    #: counted either way, and always part of their patient's decision
    indeterminate: IndeterminateMode = "exclude"
    #: how the evidence maps of the overlays and the pointing game are drawn: "integrated_gradients"
    #: (Sundararajan et al. 2017: input x path-averaged gradient from a window-centre grey image, the
    #: positive part summed over each window's slices, smoothed) or "gradcam" (the study's method, at
    #: ``gradcam_layer``). Measured on the demo's seed-0 models (cbam_drn_d_54 w0.125, 2.5-D, 128 px,
    #: conspicuous), 40 test true positives per stage, map peak on the lesion within 8 px: Grad-CAM
    #: 20% (stage 1) / 0-20% (stage 2) at every level from layer4 to the output; occlusion with a
    #: 16 px grey patch every 4 px 90% / 78% (8.8 s an image); integrated gradients 80-85% / 82-85%
    #: (0.3 s); input x gradient 60-65% / 78-80%. On 100 test true positives per stage of each of the
    #: demo's three seeds: integrated gradients 90/89/92% (stage 1) and 90/93/99% (stage 2), Grad-CAM
    #: 19/14/63% and 3/8/16%. The occlusion result shows that the model does
    #: look at the lesion: a global-average-pooled dilated network can express that evidence at
    #: feature positions away from it, which is what Grad-CAM draws. So the default is the method
    #: that agrees with occlusion at a thirtieth of its cost
    attribution: AttributionMethod = "integrated_gradients"
    #: integrated gradients' path steps (midpoint rule): on seed 0's 100 + 100 true positives 8, 16 and
    #: 32 steps hit 89/88, 90/90 and 90/90% at 0.16, 0.3 and 0.6 s an image
    attribution_steps: int = 16
    #: Gaussian sigma (model-input px) that pools integrated gradients' per-pixel evidence into
    #: regions; 2-6 px scored alike above, 2 keeps small clots apart from their vessel's neighbours
    attribution_smooth_px: float = 2.0
    #: evidence-map overlays per category (true positive, false positive, false negative) and stage
    gradcam_per_category: int = 4
    #: pointing game: a map's peak counts as on the lesion within this many model-input pixels (one
    #: cell of the output-stride-8 feature map the heat map is upsampled from)
    gradcam_pointing_tolerance_px: float = 8.0
    #: the level of each branch Grad-CAM weighs: "output", "penultimate" (the level feeding the
    #: output: DRN layer7, ResNet layer3, plain conv6) or a level name (``gradcam.branch_levels``).
    #: Used when ``attribution`` is "gradcam". Pointing game on every test true positive of three
    #: cbam_drn_d_54 (width 0.125, stacked, 128 px, conspicuous) models, layer5/6/7/8: stage 1 (789)
    #: 15/13/32/30%, stage 2 (377) 25/28/18/20%,
    #: stage 2 (406) 33/18/22/14%; penultimate has the best pooled rate (26%, output 24%) and the best
    #: worst stage (20%). No level puts the peak on the lesion for most true positives
    gradcam_layer: str = "penultimate"
    #: true positives per stage whose evidence map is measured against the lesion (pointing game,
    #: mass inside) when the lesion masks are known: a handful of overlays shows, a hundred measure
    gradcam_localisation: int = 100
    #: images per forward pass on CPU (scoring, Grad-CAM, training's validation): as many as hold this
    #: many input pixels (4 at 128 px, 1 at 256 px and above). A small batch keeps the first layers'
    #: activations (16 float32 channels per pixel) in the cache: 4 x 128² scored 2.3x faster than
    #: 64 x 128² on one core (benchmarks/evaluate.py). CUDA takes ``train.batch_size`` images
    batch_pixels: int = 4 * 128 * 128

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.attribution_steps < 1 or self.attribution_smooth_px < 0:
            raise ConfigError(f"evaluate: attribution_steps must be >= 1 and attribution_smooth_px >= 0, got "
                              f"{self.attribution_steps} and {self.attribution_smooth_px}")


@dataclass(frozen=True)
class OperatingPointConfig(_Choices):
    """Where the triage's two thresholds sit (``evaluation.operating_point``). The decision is per
    exam, so by default they are chosen on the validation patients, under ``evaluate``'s patient rule:
    a slice-level target (``train.target_sensitivity``) spends specificity on every slice of a scan.

    Defaults: 95% of the validation exams with disease stay flagged, and 95% of the PE exams come out
    of the cascade as PE (the study's sensitivity target, moved from slices to exams)."""

    #: "patient" (chosen on the validation exams) or "slice" (keep each stage's own threshold)
    level: OperatingLevel = "patient"
    patient_disease_sensitivity: float = 0.95
    patient_pe_sensitivity: float = 0.95


@dataclass(frozen=True)
class ExamConfig(_Choices):
    """The exam-level model (``models.exam``, ``training.exam``): a small sequence model over the
    frozen slice models' embeddings of one exam's slices in z order, instead of the "any slice" rule.

    Defaults: a one-layer bidirectional GRU of 32 units (RSNA-STR PE 2020 winners used one small
    recurrent layer over slice features; 32 keeps it to ~10k parameters for a few hundred training
    exams); Adam at 3e-3 for at most 80 epochs, stopped 15 epochs after the best validation loss
    (each epoch is a few batches of exams: seconds in all). The per-slice loss (weight 0.5) adds
    every labelled slice as a target beside the one label per exam: with hundreds of exams the
    exam label alone overfits."""

    #: train the exam model as a pipeline step (``train_exam``) after ``calibrate``. On by default: it
    #: costs one forward pass of both stage models over the train and val slices plus seconds of
    #: fitting, and every evaluation then shows the rules beside the exam model on the users' own data
    enabled: bool = True
    #: "gru" (bidirectional, one layer) or "attention" (attention pooling over z)
    arch: ExamArch = "gru"
    hidden: int = 32
    features: ExamFeatures = "all"
    epochs: int = 80
    patience: int = 15
    #: exams per optimiser step
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-4
    slice_loss_weight: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.hidden, self.epochs, self.patience, self.batch_size) < 1 or self.lr <= 0 or self.slice_loss_weight < 0:
            raise ConfigError("exam: hidden, epochs, patience and batch_size must be >= 1, lr > 0, slice_loss_weight >= 0")


@dataclass(frozen=True)
class GateConfig:
    """Promotion gates. A candidate must reach the minimums and, when a champion exists, lose no
    more than ``max_regression`` against it on the same test data.

    Sensitivity alone is passed by a model that flags everything, so the minimums bound all three
    sides: sensitivity (a missed PE is the costly error), specificity at the operating point (triage
    tolerates false alarms, but one that flags most negatives reorders nothing) and discrimination
    (AUROC, judged on the lower bound of its bootstrap interval over patients: a constant or random
    score sits at 0.5, and a small test set must show a clearly better model, not a lucky one). A
    metric the test data cannot measure (a class absent) fails its gate; ``None`` switches a gate off
    (e.g. a cohort without other-disease cases has no stage 2 specificity)."""

    min_patient_pe_sensitivity: float | None = 0.9
    #: exams with any disease kept off the WNL list
    min_patient_disease_sensitivity: float | None = 0.9
    #: lesion slices flagged. The operating point is set per exam (``operating_point``), where 95% of
    #: exams are caught with about 4 in 5 of their lesion slices; the floor refuses a model that finds
    #: each lesion on its largest slice only
    min_slice_disease_sensitivity: float | None = 0.75
    #: stage 1 slice specificity (WNL slices kept WNL)
    min_slice_disease_specificity: float | None = 0.5
    #: stage 2 slice specificity (other-disease slices not called PE)
    min_slice_pe_specificity: float | None = 0.5
    #: non-PE patients not flagged PE: the flag that moves a study up the worklist. Not WNL patients
    #: kept disease-negative, which the study's any-slice rule makes strict over a whole scan
    min_patient_pe_specificity: float | None = 0.5
    #: lower confidence bound (``evaluate.confidence``) of the slice AUROC, stage 1 and stage 2
    min_stage1_auroc_ci_low: float | None = 0.75
    min_stage2_auroc_ci_low: float | None = 0.75
    #: minimums on the exam model's per-patient figures (``evaluation.exam``), off by default: the
    #: triage decides with the exam model only under ``evaluate.patient_rule: exam``; switch them on
    #: then, or whenever the operator wants the exam model held to a floor. A version without an exam
    #: model fails a gate that is on (its metric is missing)
    min_exam_patient_pe_sensitivity: float | None = None
    min_exam_patient_disease_sensitivity: float | None = None
    min_exam_patient_pe_specificity: float | None = None
    #: lower confidence bound of the exam model's per-patient PE AUROC
    min_exam_patient_pe_auroc_ci_low: float | None = None
    max_regression: float = 0.02
    #: leave one site out: the largest drop of a ``loso.gate_metrics`` AUROC at a held-out site
    #: against the pooled test split. 0.10: beyond the few hundredths a site's slice AUROC moves by
    #: sampling alone, and the gap between a usable (0.85+) and a doubtful (0.75) triage model; a
    #: version registered without a leave-one-site-out summary is not judged on it
    max_site_auroc_drop: float | None = 0.10
    #: leave one site out: the largest drop of patient PE sensitivity at a held-out site (each fold at
    #: its own operating point, set on its validation exams) against the pooled test split. A missed
    #: PE is the costly error, and a site the model does not generalise to shows it here first: in
    #: ``benchmarks/loso_shift.py`` a shifted site's fold lost 0.61 of PE sensitivity while its slice
    #: AUROC drop stayed within the unshifted sites' noise; unshifted sites lost at most 0.09. 0.15:
    #: three misses in twenty PE patients, above that noise. Unmeasured (no PE patient at any held-out
    #: site) fails
    max_site_pe_sensitivity_drop: float | None = 0.15


@dataclass(frozen=True)
class RegistryConfig:
    """The registered model, its gates and the lock that serialises champion moves (promote,
    rollback; ``pe_triage.registry.lock``)."""

    model_name: str = "pe-triage"
    experiment: str = "pe-triage"
    gates: GateConfig = field(default_factory=GateConfig)
    #: how long a promote/rollback (or a load finding one in progress) waits for another one before it
    #: gives up with a conflict naming the holder: a move takes seconds, a minute covers a slow server
    lock_wait_s: float = 60.0
    #: a lock entry older than this belongs to a holder that died (kill -9, lost pod) and is removed;
    #: well above a move's seconds so a slow live holder is never taken for dead
    lock_expiry_s: float = 600.0
    #: how often a waiter re-reads the lock: two tag reads a second is nothing for the server
    lock_poll_s: float = 0.5
    #: where the package wheel a version bundles is cached per (package version, source digest):
    #: building it takes seconds, a registration of unchanged code reuses it. Per user, like pip's cache
    wheel_cache: str = "~/.cache/pe-triage/wheels"

    def __post_init__(self) -> None:
        if not 0 < self.lock_poll_s <= self.lock_wait_s < self.lock_expiry_s:
            raise ConfigError(f"registry: need 0 < lock_poll_s <= lock_wait_s < lock_expiry_s, got {self.lock_poll_s}, "
                              f"{self.lock_wait_s}, {self.lock_expiry_s}")


@dataclass(frozen=True)
class ServeConfig:
    """Serving a registered model to callers over the network (the pyfunc's ``dicom_path`` input;
    ``pe_triage.predict.allowed_input``)."""

    #: absolute local folders and ``s3://bucket/prefix`` URIs a request may name as DICOM input,
    #: checked after resolving symlinks. Empty by default: a caller must not make the server read its
    #: own files, so a server reads only what the request carries until the operator names where
    #: exports land. ``pe-triage predict`` on the command line is the operator's own and is not limited
    allowed_prefixes: tuple[str, ...] = ()
    #: ``pe-triage serve``'s TCP port (``--port`` overrides): MLflow's scoring-server default, so a
    #: client or probe written for ``mlflow models serve`` finds it
    port: int = 8080
    #: largest request body in MiB (413 above it): a 600-slice 512x512 uncompressed study is ~315 MB,
    #: so one whole study fits with room for DICOM headers; memory per request stays bounded
    max_body_mb: int = 512
    #: most slices in one request (DICOM files of a multipart request, rows of an HU request; 413
    #: above it): a CT-PA series has 200-700 slices at 0.6-1.5 mm; more means several studies at once
    max_slices: int = 1000
    #: requests in progress at once, upload included (a refused one is refused before its body is
    #: read); others get 503 + Retry-After (the server, not the caller, is busy: a proxy retries 503
    #: on another replica). 1: one study's triage already uses every core
    max_concurrency: int = 1
    #: the Retry-After of a 503 (busy, or no model loaded yet): about one study's triage time on 2 CPU
    #: cores (issue 18's goal is p50 < 10 s for 300 slices)
    retry_after_s: int = 10
    #: seconds between checks of the served alias (a moved champion is loaded within this); SIGHUP
    #: checks at once. 30 s: a registry call per replica per half minute is negligible load
    reload_poll_s: float = 30.0

    def __post_init__(self) -> None:
        if min(self.max_body_mb, self.max_slices, self.max_concurrency) < 1 or self.reload_poll_s <= 0:
            raise ConfigError("serve: max_body_mb, max_slices and max_concurrency must be >= 1, reload_poll_s > 0")
        if not 0 < self.port < 65536:
            raise ConfigError(f"serve.port: {self.port} is not a TCP port")
        bad = [p for p in self.allowed_prefixes
               if not (p.startswith("/") or (p.startswith("s3://") and p[5:6] not in ("", "/")))]
        if bad:
            raise ConfigError(f"serve.allowed_prefixes: {bad} are neither absolute local paths nor s3://bucket[/prefix]")


@dataclass(frozen=True)
class PacsConfig:
    """Studies in over DICOMweb, results back as DICOM SR + key image (``pe_triage.pacs``)."""

    #: root of the new UIDs of the result objects (SR, key image, their series). Default: the root
    #: registered to pydicom, valid anywhere and unique by its random suffix; a site sets its own org root
    uid_root: str = "1.2.826.0.1.3680043.8.498."
    #: shown in the SR and burnt into the key image: the product is triage, not diagnosis
    disclaimer: str = "NOT FOR DIAGNOSTIC USE. Research triage output; a radiologist must read the study."
    #: the SR/key image "Equipment" module: who made the object (shown by viewers)
    manufacturer: str = "pe-triage"
    institution: str = "pe-triage"
    #: attempts per DICOMweb request and the first back-off (doubled each time): 4 attempts over
    #: ~7 s ride out a PACS restart or a dropped connection without hiding a PACS that is down
    retries: int = 4
    backoff_s: float = 1.0
    #: seconds to connect / to wait for a response: a series of 600 slices streams well within 120 s
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 120.0
    #: flagged slices the SR references one by one (most suspicious first): a reader opens a few;
    #: 50 keeps the SR small (a whole flagged series would be hundreds of groups)
    max_slice_refs: int = 50
    #: where result objects wait until the PACS stored them (a refused STOW leaves them here for a
    #: retry); relative paths are from the working directory. They hold identifiers: keep it private
    outbox: str = "pacs-outbox"

    def __post_init__(self) -> None:
        timeouts = min(self.connect_timeout_s, self.read_timeout_s)
        if self.retries < 1 or self.max_slice_refs < 1 or self.backoff_s < 0 or timeouts <= 0:
            raise ConfigError("pacs: retries and max_slice_refs must be >= 1, backoff_s >= 0, timeouts > 0")
        if not self.uid_root.endswith(".") or len(self.uid_root) > 40 \
                or not all(part.isdigit() for part in self.uid_root[:-1].split(".")):
            raise ConfigError(f"pacs.uid_root: {self.uid_root!r} is not a dotted numeric root ending in '.' (<= 40 chars)")


@dataclass(frozen=True)
class ListenConfig:
    """``pe-triage listen``: a DICOM node (C-STORE SCP) that triages each study it receives and
    sends the results back (``pe_triage.pacs.listen``)."""

    #: the node's AE title, as the scanner/PACS is configured to call it (<= 16 characters)
    ae_title: str = "PE-TRIAGE"
    #: DICOM port: 11112 is IANA's DICOM port and, above 1023, needs no root (104 would)
    port: int = 11112
    #: calling AE titles admitted; any other association is rejected. Empty: the node refuses to
    #: start (an open node would triage, and store results for, whatever anyone sends)
    allowed_calling_aes: tuple[str, ...] = ()
    #: a study is complete after this many seconds without a new instance of it: scanners and
    #: PACS send a study in one go, with pauses between series of a few seconds at most
    quiet_s: float = 30.0
    #: received instances, per-study state and results wait here (<spool>/<study pseudonym>/);
    #: it holds identifiers: keep it private, and persistent so a restart resumes unfinished studies
    spool: str = "pacs-spool"
    #: where the results go, one of: a C-STORE destination (AE title, host, port) or a STOW-RS
    #: root (DICOMweb URL; its retries and timeouts are the ``pacs`` section's). Empty: none yet
    #: (the node refuses to start)
    destination_ae: str = ""
    destination_host: str = ""
    destination_port: int = 104
    stow_url: str = ""
    #: seconds to wait for a C-STORE association and answer: a PACS stores two objects in < 1 s
    timeout_s: float = 30.0
    #: attempts per study, and the first back-off (doubled each time): 5 attempts over ~15 min
    #: ride out a PACS restart or maintenance; then the study goes to <spool>/failed/ with its reason
    retries: int = 5
    backoff_s: float = 60.0

    def __post_init__(self) -> None:
        titles = (self.ae_title, self.destination_ae, *self.allowed_calling_aes)
        if any(len(t) > 16 or "\\" in t for t in titles) or not self.ae_title.strip():
            raise ConfigError("listen: AE titles are 1-16 characters without backslash")
        if not (0 < self.port < 65536 and 0 < self.destination_port < 65536):
            raise ConfigError("listen: port and destination_port must be in 1..65535")
        if self.retries < 1 or self.quiet_s <= 0 or self.backoff_s < 0 or self.timeout_s <= 0:
            raise ConfigError("listen: retries must be >= 1, quiet_s and timeout_s > 0, backoff_s >= 0")
        if self.stow_url and self.destination_host:
            raise ConfigError("listen: give destination_host (C-STORE) or stow_url (STOW-RS), not both")


@dataclass(frozen=True)
class LabelsConfig:
    """``pe-triage labels convert``: public datasets' label files -> the label manifest
    (``pe_triage.ingest.adapters``)."""

    #: LIDC-IDRI: a nodule >= 3 mm is kept when at least this many readers marked it. 2 of the 4 is
    #: the issue's default and the usual "agreement" level (LUNA16 used 3 for its reference standard)
    min_readers: int = 2
    #: LIDC-IDRI: two readers' nodules are one nodule when they share a slice and their in-plane
    #: centroids lie within this many pixels (~7 mm at LIDC's 0.6-0.8 mm pixels): readers of one
    #: nodule differ by a few pixels (4 px on lidc-idri-0002), distinct nodules by more than their radii
    lidc_centroid_tolerance_px: float = 10.0
    #: mask-labelled sets: a slice is PE when its mask covers at least this many mm² (a ~2.5 mm
    #: clot cross-section); below it a slice holds only the mask's rim or a few stray voxels
    min_mask_area_mm2: float = 5.0
    #: RSPECT: leave out exams marked indeterminate (no one can say what the model should answer)
    exclude_indeterminate: bool = True
    #: RSPECT: leave out exams failing QA (qa_motion or qa_contrast): their labels are unreliable
    exclude_qa_failed: bool = True

    def __post_init__(self) -> None:
        if self.min_readers < 1 or self.lidc_centroid_tolerance_px <= 0 or self.min_mask_area_mm2 < 0:
            raise ConfigError("labels: min_readers must be >= 1, lidc_centroid_tolerance_px > 0, min_mask_area_mm2 >= 0")


@dataclass(frozen=True)
class MonitorConfig:
    """Prediction monitoring (``pe_triage.monitoring``): a de-identified record per triage, and the
    thresholds of ``pe-triage monitor``'s drift report."""

    #: where records go: a folder or ``s3://bucket/prefix`` (Parquet, ``day=YYYY-MM-DD/``). Empty: off,
    #: so nothing is written where an operator did not choose a place (a default path would fill a
    #: container's disk or land on a node no one reads)
    store: str = ""
    #: the site or source label of each record (never taken from DICOM headers, which may name a patient)
    site: str = "default"
    #: PSI above this flags a feature: 0.25 is the usual "significant shift" level, as at onboarding
    #: (``pe_triage.quality``)
    psi_threshold: float = 0.25
    #: two-sample KS statistic above this flags a numeric feature: 0.3 is a gap no sampling noise of
    #: a day's few dozen studies explains, and below the shift a new scanner convention gives
    ks_threshold: float = 0.3
    #: a site's flag rate (studies triaged ``pe``) further than this from the reference flag rate is
    #: flagged: 0.1 is about twice the day-to-day spread of a PE prevalence of ~10-15 % at ~50 studies
    flag_rate_delta: float = 0.1
    #: PSI of a site's pooled HU bin masses (100-HU bins inside the lung crop, ``pe_triage.hu_summary``)
    #: against the training data's above this flags it: lower than ``psi_threshold`` because the masses
    #: pool thousands of pixels per study, so sampling noise is small; 0.1 sits between the calibrated
    #: synthetic sites (0.004-0.014) and a site with a +100 HU offset (1.5) in benchmarks/drift_shift.py
    hu_psi_threshold: float = 0.1
    #: the per-study soft-tissue median HU is flagged only when, besides PSI and KS, the sites' median of
    #: it is this far from the training studies': uniform tissue makes KS flag gaps of 10-27 HU between
    #: two small cohorts of one synthetic site, while a miscalibration worth acting on (a wrong intercept
    #: convention) is 100 HU or more; 30 HU moves a 400-HU window's grey levels by under 8 %
    hu_median_delta: float = 30.0
    #: training studies whose HU summary makes the reference (spread over the store): 200 bound the
    #: decile PSI's noise as for the records, and take seconds to read
    hu_reference_studies: int = 200

    def __post_init__(self) -> None:
        if self.psi_threshold <= 0 or not 0 < self.ks_threshold <= 1 or not 0 < self.flag_rate_delta <= 1:
            raise ConfigError("monitor: psi_threshold must be > 0, ks_threshold and flag_rate_delta in (0, 1]")
        if self.hu_psi_threshold <= 0 or self.hu_median_delta <= 0 or self.hu_reference_studies < 1:
            raise ConfigError("monitor: hu_psi_threshold and hu_median_delta must be > 0, hu_reference_studies >= 1")
        if not self.site or "/" in self.site:
            raise ConfigError("monitor.site: a non-empty label without '/'")


@dataclass(frozen=True)
class Config:
    synth: SynthConfig = field(default_factory=SynthConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    loso: LosoConfig = field(default_factory=LosoConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    operating_point: OperatingPointConfig = field(default_factory=OperatingPointConfig)
    exam: ExamConfig = field(default_factory=ExamConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    pacs: PacsConfig = field(default_factory=PacsConfig)
    listen: ListenConfig = field(default_factory=ListenConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(options[0], value, where)
    if origin is Literal:
        _check_choice(tp, value, where)
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from a (partial) mapping, rejecting unknown keys."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(str(k) for k in set(data) - names)  # YAML keys may be numbers, which do not sort with str
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def load_config(path: str | Path | None = None) -> Config:
    """Defaults, overridden by the YAML file at ``path`` when given."""
    if path is None:
        return Config()
    try:
        text = Path(path).read_bytes().decode()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    return parse_config(text, source=str(path))


def parse_config(text: str, *, source: str = "configuration") -> Config:
    """Defaults, overridden by YAML ``text`` (``""`` for the defaults): the pipeline components
    receive the configuration as text, the CLI as a file. Every mistake is one :class:`ConfigError`
    line that starts with ``source``, so a log names the file to fix."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise _yaml_error(source, e) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping")
    try:
        return from_dict(Config, data)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _yaml_error(source: str, error: yaml.YAMLError) -> ConfigError:
    """The file, line and column and what is wrong, on one line (yaml's own message spans several
    and quotes the text)."""
    mark = getattr(error, "problem_mark", None)
    if not isinstance(error, yaml.MarkedYAMLError) or mark is None:
        return ConfigError(f"{source}: invalid YAML: {' '.join(str(error).split())}")
    context = f" ({error.context})" if error.context and error.problem else ""
    return ConfigError(f"{source}, line {mark.line + 1}, column {mark.column + 1}: invalid YAML: "
                       f"{error.problem or error.context}{context}")


def to_dict(config: Any) -> dict[str, Any]:
    """Plain mapping (for YAML dumps, MLflow params and Parquet metadata)."""
    return dataclasses.asdict(config)
