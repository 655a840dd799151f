"""Config: every setting of the training job, declared once (common/settings.py) and checked.

Each field of Config declares its environment variable, parser, default (or the rule that gives
it, such as IMAGE_SIZE's by BACKBONE) and help; `Config.from_env(os.environ, argv)` reads them from
the environment and from flags (a flag beats its variable), and the same declarations give
`python -m job --help` and docs/settings.md. A bad value raises ConfigError with one line naming the
variable and what it accepts; the entrypoint turns that into exit code 2 before any work starts.
"""
from __future__ import annotations

import dataclasses
import datetime
import re
from pathlib import Path
from typing import Mapping, Sequence

import storage
from common import run_files, settings
from common.cache_dir import DEFAULT_CACHE_DIR
from common.settings import ConfigError, Invalid, Parser, Rule, setting
from job.cluster import distribute
from job.inputs.budget import CacheBudget

BACKBONES = ("vgg16", "mobilenet_v2", "resnet50", "efficientnet_b0")
MOBILENET_V2_ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
MIXED_PRECISION_MODES = ("auto", "off", "float16", "bfloat16")
DEFAULT_CHECKPOINT_FOLDER = "checkpoints"  # inside the run directory when CHECKPOINT_URI is unset
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
PROG = "python -m job"
TRIAL_ID_PATTERN = re.compile(r"^[A-Za-z0-9]{1,32}$")  # Vertex AI numbers its trials 1, 2, ...
# TUNING_METRIC: the validation figures a tuning trial may be judged by (job/results/tuning.py);
# all are "higher is better", the goal the study spec (infra/vertex/hptuningjob.yaml) maximises.
TUNING_METRICS = ("accuracy", "macro_recall", "macro_f1")


def default_image_size(backbone: str) -> int:
    """150 for VGG16 as in the classic recipe; the backbone's native size otherwise."""
    return 150 if backbone == "vgg16" else 224


def default_fine_tune_from(backbone: str) -> str:
    """The first layer of what phase 2 unfreezes: each backbone's top block; for MobileNetV2 its
    top four blocks (13-16, the 7x7 stage), which did better on validation than block 16 alone."""
    return {
        "vgg16": "block5_conv1",
        "mobilenet_v2": "block_13_expand",
        "resnet50": "conv5_block1_1_conv",
        "efficientnet_b0": "block7a_expand_conv",
    }.get(backbone, "")


def default_fine_tune_learning_rate(backbone: str) -> float:
    """1e-5 as in the classic VGG16 recipe; 1e-4 for MobileNetV2's top four blocks, the pair
    that scored best on the validation split of the chest X-ray benchmark (bench/quality.py)."""
    return 1e-4 if backbone == "mobilenet_v2" else 1e-5


def new_run_id(now: datetime.datetime | None = None) -> str:
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return now.strftime("run-%Y%m%d-%H%M%S")


# --- parsers of the job's own kinds of value (common.settings has the generic ones) ---

def _normalised_uri(raw: str) -> str:
    try:
        return storage.normalise_uri(raw)
    except ValueError as problem:
        raise Invalid(str(problem)) from None


def _local_folder(raw: str) -> Path:
    """A URI (gs:// or any other scheme://) is refused: taken as a path it would create a folder
    named 'gs:' in the working directory."""
    if "://" in raw:
        raise Invalid("expected a local folder (the job's scratch space on this machine), "
                      "not a URI")
    return Path(_normalised_uri(raw))


def _backbone(raw: str) -> str:
    if raw.lower() in BACKBONES:
        return raw.lower()
    looks_like_handle = "://" in raw or raw.startswith(("/", "./")) or raw.count("/") >= 2
    if looks_like_handle:
        return raw
    raise ValueError


def _weights(raw: str) -> str:
    if raw.lower() in ("imagenet", "none"):
        return raw.lower()
    if raw.endswith(".h5"):
        return storage.normalise_uri(raw)
    raise ValueError


def _run_id(raw: str) -> str:
    if not RUN_ID_PATTERN.match(raw):
        raise ValueError
    return raw


def _trial_id(raw: str) -> str:
    if not TRIAL_ID_PATTERN.match(raw):
        raise ValueError
    return raw


def _local_file(raw: str) -> str:
    """A file on this machine, made absolute; a URI is refused, as for a local folder."""
    if "://" in raw:
        raise Invalid("expected a file on this machine, not a URI")
    return str(Path(raw).expanduser().absolute())


def _cluster(tf_config: str) -> distribute.Cluster | None:
    try:
        return distribute.parse_cluster(tf_config)
    except distribute.ClusterError as error:
        raise ConfigError(str(error)) from None


def _tf_config_of_cluster_spec(cluster_spec: str) -> str:
    try:
        return distribute.tf_config_from_cluster_spec(cluster_spec)
    except distribute.ClusterError as error:
        raise ConfigError(str(error)) from None


URI = Parser("a local folder or gs://bucket/prefix", _normalised_uri)
LOCAL_FOLDER = Parser("a local folder", _local_folder)
BACKBONE = Parser("one of " + ", ".join(BACKBONES) + ", or a TF-Hub/Kaggle handle or SavedModel "
                  "path of an image feature vector", _backbone)
WEIGHTS = Parser("imagenet, none, or a path or gs:// URI of a Keras .h5 weights file", _weights)
RUN_ID = Parser("letters, digits, '.', '_' or '-' (at most 128, no leading '.' or '-')", _run_id)
CACHE_BUDGET = Parser("a share of the free space such as 80%, or a size such as 0, 500MB or 20GiB",
                      CacheBudget.parse)
CLUSTER = Parser("a TF_CONFIG JSON object", _cluster)
TRIAL_ID = Parser("letters and digits (at most 32), as Vertex AI numbers trials", _trial_id)
LOCAL_FILE = Parser("a file on this machine", _local_file)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Trains an image classifier on a folder of class folders (transfer learning, two phases) and
    writes the run to OUTPUT_URI/RUN_ID/."""

    data_uri: str = setting(
        "DATA_URI", URI, required="a local folder or a gs://bucket/prefix",
        help="the images: a local folder or gs://bucket/prefix of class folders")
    output_uri: str = setting(
        "OUTPUT_URI", URI, Rule(lambda config: storage.normalise_uri("outputs"), "outputs"),
        help="where runs are written: OUTPUT_URI/RUN_ID/ (a relative path: in the working "
             "directory)")
    run_id: str = setting(
        "RUN_ID", RUN_ID, Rule(lambda config: new_run_id(), "run-YYYYmmdd-HHMMSS (UTC)"),
        help="name of the run; the same RUN_ID resumes an unfinished run and leaves a complete one "
             "untouched, on the same data and settings only (otherwise exit 2)")
    cache_dir: Path = setting(
        "CACHE_DIR", LOCAL_FOLDER, DEFAULT_CACHE_DIR, shown="~/.cache/image-classifier-job",
        help="a local folder (a URI is refused) for pulled data and weights, decoded-image and "
             "feature caches, local checkpoints; the job marks it as its own on first use and "
             "refuses a folder that already holds other files")
    backbone: str = setting(
        "BACKBONE", BACKBONE, "vgg16",
        help="vgg16, mobilenet_v2, resnet50, efficientnet_b0, or a TF-Hub/Kaggle handle or "
             "SavedModel path of an image feature-vector module (loaded through "
             "tensorflow_hub.resolve, its serving_default signature wrapped in "
             "job.training.model.HubModule)")
    alpha: float = setting(
        "ALPHA", settings.number_choice(MOBILENET_V2_ALPHAS), 1.0,
        help="MobileNetV2 width: 0.35, 0.5, 0.75, 1.0, 1.3 or 1.4")
    weights: str = setting(
        "WEIGHTS", WEIGHTS, "imagenet",
        help="imagenet (downloaded by Keras; fails fast if it cannot be), none (random: every "
             "layer trains from scratch in one phase), or a local path or gs:// URI of a Keras .h5 "
             "weights file without top")
    image_size: int = setting(
        "IMAGE_SIZE", settings.integer(32),
        Rule(lambda config: default_image_size(config.backbone), "150 for vgg16, else 224"),
        help="side of the square input, pixels (at least 32)")
    batch_size: int = setting(
        "BATCH_SIZE", settings.integer(1), 32,
        help="images per step and replica (the global batch is BATCH_SIZE x replicas)")
    head_epochs: int = setting(
        "HEAD_EPOCHS", settings.integer(0), 20,
        help="phase 1 epochs of a head with a hidden layer (DENSE_UNITS above 0; at most: early "
             "stopping); the default linear head is solved, not trained by epochs")
    fine_tune_epochs: int = setting(
        "FINE_TUNE_EPOCHS", settings.integer(0), 10, help="phase 2 epochs; 0 skips phase 2")
    head_learning_rate: float = setting(
        "HEAD_LEARNING_RATE", settings.positive_number(), 1e-3,
        help="Adam learning rate of phase 1, for a head with a hidden layer")
    fine_tune_learning_rate: float = setting(
        "FINE_TUNE_LEARNING_RATE", settings.positive_number(),
        Rule(lambda config: default_fine_tune_learning_rate(config.backbone),
             "1e-4 for mobilenet_v2, else 1e-5"),
        help="RMSprop learning rate of phase 2")
    fine_tune_from: str = setting(
        "FINE_TUNE_FROM", settings.text(),
        Rule(lambda config: default_fine_tune_from(config.backbone),
             "block5_conv1 (vgg16), block_13_expand (mobilenet_v2: its top four blocks), "
             "conv5_block1_1_conv (resnet50), block7a_expand_conv (efficientnet_b0); "
             "unset for a hub module"),
        help="first layer unfrozen in phase 2; must name a layer of the base (hub modules are "
             "fine-tuned whole)")
    # DENSE_UNITS=0: a linear head, solved in phase 1 as a linear probe (job/training/probe.py).
    dense_units: int = setting(
        "DENSE_UNITS", settings.integer(0), 0,
        help="0: a linear head (dropout, then the output layer) whose phase 1 is a linear probe: "
             "a logistic regression on the pooled features of the unaugmented training images, "
             "its L2 strength chosen on validation, copied into the output layer before "
             "fine-tuning starts. Above 0: a hidden ReLU Dense layer of that width, trained in "
             "phase 1 by Adam on the augmented views")
    dropout: float = setting(
        "DROPOUT", settings.fraction(), 0.2,
        help="dropout rate of the head, 0 to 1 (in phase 2, and in phase 1 of a head with a "
             "hidden layer)")
    label_smoothing: float = setting(
        "LABEL_SMOOTHING", settings.fraction(open_high=True), 0.0,
        help="move the training targets this far towards uniform (0 to below 1), e.g. 0.1: 1 "
             "becomes 0.95 and 0 becomes 0.05 for two classes")
    # With CACHE_FEATURES on, the frozen layers run once on AUGMENT_VIEWS augmented views of each
    # training image and training reuses those outputs; with it off, images are augmented afresh
    # every epoch (slow: the frozen layers run every epoch).
    augment: bool = setting(
        "AUGMENT", settings.switch(), True,
        help="random horizontal flip, rotation (5 %), zoom (30 % in to 10 % out, height and width "
             "apart, so framing and aspect ratio vary), translation (10 %), brightness (10 %) and "
             "contrast (20 %) of the training images; validation and test images are never "
             "augmented")
    augment_views: int = setting(
        "AUGMENT_VIEWS", settings.integer(1), 2,
        help="with AUGMENT=1 and CACHE_FEATURES=1: augmented views of each training image that "
             "the frozen layers run on once (seeded by SEED)")
    cache_features: bool = setting(
        "CACHE_FEATURES", settings.switch(), True,
        help="train each phase on the cached outputs of its frozen layers (computed once: on the "
             "images, or on AUGMENT_VIEWS augmented views of them); 0 runs the whole model every "
             "epoch, augmenting afresh each time (slow on a CPU)")
    cache_budget: CacheBudget = setting(
        "CACHE_BUDGET", CACHE_BUDGET, CacheBudget(), shown="80%",
        help="the scratch disk (under CACHE_DIR) the caches may fill: a share of the volume's free "
             "space (counting what the run's own scratch already holds, so a restart decides "
             "alike) or a size such as 0, 500MB, 20GiB. Each cache's size is known before a byte "
             "is written and recorded in metrics.json (cache); a phase whose cache would not fit "
             "trains online, as with CACHE_FEATURES=0, and a warning says so. Across workers all "
             "use the smallest worker's budget")
    tta: bool = setting(
        "TTA", settings.switch(), False,
        help="1: score validation and test on the mean prediction of each image and its "
             "horizontal flip; metrics.json also keeps the scores without TTA (without_tta)")
    drop_cross_split_duplicates: bool = setting(
        "DROP_CROSS_SPLIT_DUPLICATES", settings.switch(), False,
        help="1: leave out of training the images whose bytes equal a validation or test image's "
             "(the audit's exact leaks), listed in audit.json; 0: the audit removes nothing")
    validation_split: float = setting(
        "VALIDATION_SPLIT", settings.fraction(open_high=True), 0.2,
        help="share of the training images held out for validation when there is no "
             "validation/ folder")
    test_split: float = setting(
        "TEST_SPLIT", settings.fraction(open_high=True), 0.1,
        help="share held out for testing when there is no test/ folder")
    patience: int = setting(
        "PATIENCE", settings.integer(1), 3,
        help="early-stopping patience, epochs without a better validation loss")
    seed: int = setting(
        "SEED", settings.integer(0), 42,
        help="seed of splits, shuffling, initial weights and augmentation")
    mixed_precision: str = setting(
        "MIXED_PRECISION", settings.choice(MIXED_PRECISION_MODES), "auto",
        help="auto, off, float16 or bfloat16")
    class_weights: str = setting(
        "CLASS_WEIGHTS", settings.choice(("auto", "off")), "auto",
        help="auto: balanced class weights when the largest class has more than 1.5x the images "
             "of the smallest; off")
    model_uri: str = setting(
        "AIP_MODEL_DIR", URI,
        Rule(lambda config: storage.join(config.run_uri, run_files.SAVED_MODEL),
             "OUTPUT_URI/RUN_ID/saved_model"),
        help="where the SavedModel is published (Vertex AI sets it)")
    # A CHECKPOINT_URI (or Vertex AI's AIP_CHECKPOINT_DIR) holds one prefix per run,
    # checkpoint_uri, so that the run's own checkpoints can be cleared without touching anything
    # else there.
    checkpoint_root: str = setting(
        "CHECKPOINT_URI", URI, "", also={"AIP_CHECKPOINT_DIR": str},
        shown="unset: OUTPUT_URI/RUN_ID/checkpoints",
        help="a local folder or gs:// prefix for checkpoints; each run keeps its own under "
             "CHECKPOINT_URI/RUN_ID/, mirrored after every epoch (Vertex AI sets "
             "AIP_CHECKPOINT_DIR)")
    tensorboard_uri: str = setting(
        "AIP_TENSORBOARD_LOG_DIR", URI, "",
        help="write TensorBoard logs of both phases here (Vertex AI sets it)")
    # Multi-worker training (job/cluster/distribute.py): the tf.distribute cluster, set by
    # job/cluster/tfconfig.py on Kubernetes and by Vertex AI (which also sets CLUSTER_SPEC, its
    # own form of it). None: one machine.
    cluster: distribute.Cluster | None = setting(
        "TF_CONFIG", CLUSTER, None, also={"CLUSTER_SPEC": _tf_config_of_cluster_spec},
        shown="unset: one machine",
        help="the multi-worker cluster, JSON {\"cluster\": {\"worker\": [\"host:port\", ...]}, "
             "\"task\": {\"type\": \"worker\", \"index\": 0}}; more than one worker selects "
             "MultiWorkerMirroredStrategy. Vertex AI's CLUSTER_SPEC is read when it is unset")
    export_onnx: bool = setting(
        "EXPORT_ONNX", settings.switch(), False,
        help="1: run the ONNX export at the end of the run, with the export's settings from the "
             "environment (`python -m export --help`)")
    promote_uri: str = setting(
        "PROMOTE_URI", URI, "",
        help="the production model: versions/RUN_ID/ and CURRENT.json; each run is promoted there "
             "only when no worse than the model in place (docs/promotion.md); unset, no promotion")
    # 0.01 (one point): the int8 gate's tolerance, and twice the half-point differences that come
    # and go between runs on the same data, while a drop of several points (a bad night's labels)
    # never passes.
    promote_max_drop: float = setting(
        "PROMOTE_MAX_DROP", settings.fraction(), 0.01,
        help="the largest significant drop in test accuracy or macro recall that still promotes")
    promote_min_accuracy: float = setting(
        "PROMOTE_MIN_ACCURACY", settings.fraction(), 0.0,
        help="absolute floor on the run's test accuracy (0: none)")
    promote_min_macro_recall: float = setting(
        "PROMOTE_MIN_MACRO_RECALL", settings.fraction(), 0.0,
        help="absolute floor on the run's test macro recall (0: none)")
    storage_deadline: float = setting(
        "STORAGE_DEADLINE", settings.positive_number(), storage.DEFAULT_RETRY_DEADLINE_S,
        help="seconds a storage call may go without a request or transfer succeeding before the "
             "job gives up (exit 1)")

    # A Vertex AI hyperparameter tuning trial (job/results/tuning.py): its run is
    # RUN_ID-trial-<id> (see from_env), and the chief reports the validation TUNING_METRIC through
    # cloudml-hypertune. Either CLOUD_ML_TRIAL_ID or CLOUD_ML_HP_METRIC_FILE turns the reports on.
    trial_id: str = setting(
        "CLOUD_ML_TRIAL_ID", TRIAL_ID, "", shown="(Vertex AI sets it per tuning trial)",
        help="a hyperparameter tuning trial: the run is RUN_ID-trial-<id> (its outputs, "
             "checkpoints and caches), so trials never share a place and a restarted trial "
             "resumes its own; RUN_ID must be set and PROMOTE_URI unset (docs/vertex.md)")
    tuning_metric: str = setting(
        "TUNING_METRIC", settings.choice(TUNING_METRICS), "accuracy",
        help="the figure a trial reports, as validation_<metric>: accuracy, macro_recall or "
             "macro_f1 of the validation split (never test: the study chooses on what it is "
             "told, and the test figures must stay unseen)")
    hp_metric_file: str = setting(
        "CLOUD_ML_HP_METRIC_FILE", LOCAL_FILE, "", shown="/tmp/hypertune/output.metrics",
        help="the local file cloudml-hypertune writes the reports to (JSON lines); set, it also "
             "turns the reports on outside a trial")

    def __post_init__(self):
        settings.apply_rules(self)

    @property
    def run_uri(self) -> str:
        return storage.join(self.output_uri, self.run_id)

    @property
    def checkpoint_uri(self) -> str:
        """This run's own checkpoint prefix: CHECKPOINT_URI/RUN_ID, else
        OUTPUT_URI/RUN_ID/checkpoints."""
        if self.checkpoint_root:
            return storage.join(self.checkpoint_root, self.run_id)
        return storage.join(self.run_uri, DEFAULT_CHECKPOINT_FOLDER)

    @property
    def reports_tuning_metric(self) -> bool:
        """A tuning trial, or a run asked to write its tuning metric (CLOUD_ML_HP_METRIC_FILE)."""
        return bool(self.trial_id or self.hp_metric_file)

    @property
    def solves_probe(self) -> bool:
        """Phase 1 fits a linear head as a linear probe, not by epochs (DENSE_UNITS=0)."""
        return self.dense_units == 0 and not self.from_scratch

    @property
    def from_scratch(self) -> bool:
        """WEIGHTS=none: nothing pretrained to transfer, so every layer trains from the start, in
        one phase, on the images (job.training.phases.plan)."""
        return self.weights == "none" and not self.is_hub_backbone

    @property
    def is_hub_backbone(self) -> bool:
        return self.backbone not in BACKBONES

    @classmethod
    def from_env(cls, environ: Mapping[str, str], argv: Sequence[str] = ()) -> "Config":
        """The settings the environment and the flags in argv give (a flag beats its variable),
        checked together; ConfigError, one line, for the first problem."""
        config = settings.read(cls, environ, argv, PROG)
        if config.trial_id:
            run_id = trial_run_id(config.run_id, config.trial_id,
                                  given=settings.given(cls, "run_id", environ, argv, PROG))
            config = settings.read(cls, environ, argv, PROG, overrides={"run_id": run_id})
        if config.is_hub_backbone and config.fine_tune_from:
            raise ConfigError(
                "FINE_TUNE_FROM applies to the built-in backbones only; "
                f"unset it for the hub module {config.backbone!r}"
            )
        if config.validation_split + config.test_split >= 0.9:
            raise ConfigError(
                "VALIDATION_SPLIT + TEST_SPLIT must leave at least 10% of the images to train on"
            )
        if config.trial_id and config.promote_uri:
            raise ConfigError(
                f"PROMOTE_URI is set in a tuning trial (CLOUD_ML_TRIAL_ID={config.trial_id}): "
                "each trial would promote itself; leave it out of the tuning job and run the best "
                "trial's settings as a custom job with PROMOTE_URI")
        _refuse_overlaps(config)
        return config


def trial_run_id(run_id: str, trial_id: str, given: bool) -> str:
    """The run of one tuning trial: RUN_ID-trial-<id>. Every trial of a tuning job gets the same
    environment, RUN_ID included, so the suffix keeps each trial's outputs, checkpoints, claim and
    caches apart, and a trial that Vertex AI restarts (same environment, same trial id) resumes
    its own run. Hence RUN_ID must be set: a generated one would differ on the restart."""
    if not given:
        raise ConfigError(f"CLOUD_ML_TRIAL_ID={trial_id} (a tuning trial) needs RUN_ID: set it in "
                          "the tuning job's trial spec, so that a restarted trial resumes its own "
                          f"run, RUN_ID-trial-{trial_id}")
    trial_run = f"{run_id}-trial-{trial_id}"
    if not RUN_ID_PATTERN.match(trial_run):
        raise ConfigError(f"RUN_ID={run_id!r} is too long for a tuning trial: RUN_ID-trial-"
                          f"{trial_id} must be at most 128 characters")
    return trial_run


def _refuse_overlaps(config: Config) -> None:
    """Refuses places that overlap, where writing or clearing one could touch another: outputs
    or checkpoints inside the data (or the data inside them), checkpoints over the run's outputs,
    a local cache (which the job prunes) over any of them. The default checkpoint and model
    folders inside the run directory are left out: the run's manifest lists neither as its own,
    and the run directory itself is checked."""
    places = {"DATA_URI": config.data_uri, "OUTPUT_URI/RUN_ID": config.run_uri,
              "CHECKPOINT_URI/RUN_ID": config.checkpoint_uri, "AIP_MODEL_DIR": config.model_uri,
              "CACHE_DIR": str(config.cache_dir)}
    if config.promote_uri:
        places["PROMOTE_URI"] = config.promote_uri
    if config.checkpoint_uri == storage.join(config.run_uri, DEFAULT_CHECKPOINT_FOLDER):
        del places["CHECKPOINT_URI/RUN_ID"]
    if config.model_uri == storage.join(config.run_uri, run_files.SAVED_MODEL):
        del places["AIP_MODEL_DIR"]
    names = list(places)
    for index, first in enumerate(names):
        for second in names[index + 1:]:
            if storage.overlaps(places[first], places[second]):
                raise ConfigError(f"{first} ({places[first]}) and {second} ({places[second]}) "
                                  "overlap (one is, or lies inside, the other), so writing or clearing one "
                                  "could delete the other; point them at separate places")
