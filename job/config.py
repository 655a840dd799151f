"""Config: every setting of the job, read from environment variables and validated in one place.

`Config.from_env(os.environ)` is the only place that reads the environment. A bad value raises
ConfigError with one line naming the variable and what it accepts; the entrypoint turns that into
exit code 2 before any work starts.
"""
from __future__ import annotations

import dataclasses
import datetime
import re
from pathlib import Path
from typing import Callable, Mapping

import storage
from job.cluster import distribute
from job.inputs.budget import CacheBudget

BACKBONES = ("vgg16", "mobilenet_v2", "resnet50", "efficientnet_b0")
MOBILENET_V2_ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
MIXED_PRECISION_MODES = ("auto", "off", "float16", "bfloat16")
DEFAULT_CHECKPOINT_FOLDER = "checkpoints"  # inside the run directory when CHECKPOINT_URI is unset
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ConfigError(ValueError):
    """A setting is missing or has a value the job cannot use."""


@dataclasses.dataclass(frozen=True)
class Config:
    data_uri: str
    output_uri: str = "outputs"
    run_id: str = ""
    cache_dir: Path = Path.home() / ".cache" / "image-classifier-job"
    backbone: str = "vgg16"
    alpha: float = 1.0
    weights: str = "imagenet"
    image_size: int = 150
    batch_size: int = 32
    head_epochs: int = 20
    fine_tune_epochs: int = 10
    head_learning_rate: float = 1e-3
    fine_tune_learning_rate: float = 1e-5
    fine_tune_from: str = "block5_conv1"
    # DENSE_UNITS=0: a linear head, solved in phase 1 as a linear probe (job/training/probe.py); above 0,
    # a hidden Dense layer of that many units, trained in phase 1 by Adam for HEAD_EPOCHS.
    dense_units: int = 0
    dropout: float = 0.2
    label_smoothing: float = 0.0
    # AUGMENT: train on random flips, rotations, zooms, shifts, brightness and contrast. With
    # CACHE_FEATURES on, the frozen layers run once on AUGMENT_VIEWS augmented views of each
    # training image and training reuses those outputs; with it off, images are augmented afresh
    # every epoch (slow: the frozen layers run every epoch). Validation and test are never augmented.
    augment: bool = True
    augment_views: int = 2
    cache_features: bool = True
    # CACHE_BUDGET: the scratch disk the caches may fill (job/inputs/budget.py); a phase whose cache
    # would not fit trains online.
    cache_budget: CacheBudget = CacheBudget()
    tta: bool = False  # evaluate on the mean prediction of each image and its horizontal flip
    validation_split: float = 0.2
    test_split: float = 0.1
    patience: int = 3
    seed: int = 42
    mixed_precision: str = "auto"
    class_weights: str = "auto"
    # DROP_CROSS_SPLIT_DUPLICATES: leave out of training the images whose bytes equal a validation
    # or test image's (exact leaks, job/inputs/audit.py). Off: the audit lists them, removes nothing.
    drop_cross_split_duplicates: bool = False
    model_uri: str = ""
    checkpoint_uri: str = ""
    tensorboard_uri: str = ""
    # Multi-worker training (job/cluster/distribute.py). TF_CONFIG: the tf.distribute cluster, JSON
    # {"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": 0}}, set by
    # job/cluster/tfconfig.py on Kubernetes and by Vertex AI. CLUSTER_SPEC: Vertex AI's own form of it
    # (workerpool0..3), used when TF_CONFIG is unset. Neither set: one machine.
    tf_config: str = ""
    cluster_spec: str = ""
    cluster: distribute.Cluster | None = None  # the two above, parsed; None: one machine
    export_onnx: bool = False
    # PROMOTE_URI: the production model as versions and CURRENT.json (job/promotion/promote.py,
    # docs/promotion.md); unset, no promotion. A run is held back for a significant drop larger
    # than PROMOTE_MAX_DROP in test accuracy or macro recall. 0.01 (one point): the int8 gate's
    # tolerance, and twice the half-point differences that come and go between runs on the same
    # data, while a drop of several points (a bad night's labels) never passes.
    promote_uri: str = ""
    promote_max_drop: float = 0.01
    promote_min_accuracy: float = 0.0  # absolute floors: 0, none
    promote_min_macro_recall: float = 0.0
    storage_deadline: float = storage.DEFAULT_RETRY_DEADLINE_S  # seconds without progress

    @property
    def run_uri(self) -> str:
        return storage.join(self.output_uri, self.run_id)

    @property
    def solves_probe(self) -> bool:
        """Phase 1 fits a linear head as a linear probe, not by epochs (DENSE_UNITS=0)."""
        return self.dense_units == 0 and not self.from_scratch

    @property
    def from_scratch(self) -> bool:
        """WEIGHTS=none: nothing pretrained to transfer, so every layer trains from the start, in
        one phase, on the images (job.training.train.phases)."""
        return self.weights == "none" and not self.is_hub_backbone

    @property
    def is_hub_backbone(self) -> bool:
        return self.backbone not in BACKBONES

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> "Config":
        env = EnvReader(environ)
        data_uri = env.uri("DATA_URI", required=True)
        backbone = env.backbone("BACKBONE", "vgg16")
        output_uri = env.uri("OUTPUT_URI", "outputs")
        run_id = env.run_id("RUN_ID")
        run_uri = _join(output_uri, run_id)
        is_hub = backbone not in BACKBONES
        # A CHECKPOINT_URI (or Vertex AI's AIP_CHECKPOINT_DIR) holds one prefix per run, so that
        # the run's own checkpoints can be cleared without touching anything else there.
        checkpoint_base = env.uri("CHECKPOINT_URI", env.uri("AIP_CHECKPOINT_DIR", ""))
        tf_config, cluster_spec = env.text("TF_CONFIG", ""), env.text("CLUSTER_SPEC", "")
        try:
            cluster = distribute.parse_cluster(tf_config, cluster_spec)
        except distribute.ClusterError as error:
            raise ConfigError(str(error)) from None
        config = cls(
            data_uri=data_uri,
            output_uri=output_uri,
            run_id=run_id,
            cache_dir=env.local_folder("CACHE_DIR", cls.cache_dir),
            backbone=backbone,
            alpha=env.choice_float("ALPHA", 1.0, MOBILENET_V2_ALPHAS),
            weights=env.weights("WEIGHTS", "imagenet"),
            image_size=env.integer("IMAGE_SIZE", default_image_size(backbone), minimum=32),
            batch_size=env.integer("BATCH_SIZE", 32, minimum=1),
            head_epochs=env.integer("HEAD_EPOCHS", 20, minimum=0),
            fine_tune_epochs=env.integer("FINE_TUNE_EPOCHS", 10, minimum=0),
            head_learning_rate=env.positive_float("HEAD_LEARNING_RATE", 1e-3),
            fine_tune_learning_rate=env.positive_float("FINE_TUNE_LEARNING_RATE",
                                                       default_fine_tune_learning_rate(backbone)),
            fine_tune_from=env.text("FINE_TUNE_FROM", default_fine_tune_from(backbone)),
            dense_units=env.integer("DENSE_UNITS", 0, minimum=0),
            dropout=env.fraction("DROPOUT", 0.2),
            label_smoothing=env.fraction("LABEL_SMOOTHING", 0.0, open_high=True),
            augment=env.flag("AUGMENT", True),
            augment_views=env.integer("AUGMENT_VIEWS", 2, minimum=1),
            cache_features=env.flag("CACHE_FEATURES", True),
            cache_budget=env.cache_budget("CACHE_BUDGET", CacheBudget()),
            tta=env.flag("TTA", False),
            validation_split=env.fraction("VALIDATION_SPLIT", 0.2, open_high=True),
            test_split=env.fraction("TEST_SPLIT", 0.1, open_high=True),
            patience=env.integer("PATIENCE", 3, minimum=1),
            seed=env.integer("SEED", 42, minimum=0),
            mixed_precision=env.choice("MIXED_PRECISION", "auto", MIXED_PRECISION_MODES),
            class_weights=env.choice("CLASS_WEIGHTS", "auto", ("auto", "off")),
            drop_cross_split_duplicates=env.flag("DROP_CROSS_SPLIT_DUPLICATES", False),
            model_uri=env.uri("AIP_MODEL_DIR", _join(run_uri, "saved_model")),
            checkpoint_uri=(_join(checkpoint_base, run_id) if checkpoint_base
                            else _join(run_uri, DEFAULT_CHECKPOINT_FOLDER)),
            tensorboard_uri=env.uri("AIP_TENSORBOARD_LOG_DIR", ""),
            tf_config=tf_config,
            cluster_spec=cluster_spec,
            cluster=cluster,
            export_onnx=env.flag("EXPORT_ONNX", False),
            promote_uri=env.uri("PROMOTE_URI", ""),
            promote_max_drop=env.fraction("PROMOTE_MAX_DROP", 0.01),
            promote_min_accuracy=env.fraction("PROMOTE_MIN_ACCURACY", 0.0),
            promote_min_macro_recall=env.fraction("PROMOTE_MIN_MACRO_RECALL", 0.0),
            storage_deadline=env.positive_float("STORAGE_DEADLINE",
                                                storage.DEFAULT_RETRY_DEADLINE_S),
        )
        if is_hub and config.fine_tune_from:
            raise ConfigError(
                "FINE_TUNE_FROM applies to the built-in backbones only; "
                f"unset it for the hub module {backbone!r}"
            )
        if config.validation_split + config.test_split >= 0.9:
            raise ConfigError(
                "VALIDATION_SPLIT + TEST_SPLIT must leave at least 10% of the images to train on"
            )
        _refuse_overlaps(config)
        return config


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
    if config.checkpoint_uri == _join(config.run_uri, DEFAULT_CHECKPOINT_FOLDER):
        del places["CHECKPOINT_URI/RUN_ID"]
    if config.model_uri == _join(config.run_uri, "saved_model"):
        del places["AIP_MODEL_DIR"]
    names = list(places)
    for index, first in enumerate(names):
        for second in names[index + 1:]:
            if storage.overlaps(places[first], places[second]):
                raise ConfigError(f"{first} ({places[first]}) and {second} ({places[second]}) "
                                  "overlap (one is, or lies inside, the other), so writing or clearing one "
                                  "could delete the other; point them at separate places")


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


def _join(uri: str, *parts: str) -> str:
    return storage.join(uri, *parts)


class EnvReader:
    """Typed access to the environment; every parse error names the variable and what it accepts."""

    def __init__(self, environ: Mapping[str, str]):
        self.environ = environ

    def _get(self, name: str) -> str | None:
        value = self.environ.get(name)
        return value.strip() if value is not None and value.strip() != "" else None

    def _parse(self, name: str, default, accepts: str, parse: Callable[[str], object]):
        raw = self._get(name)
        if raw is None:
            return default
        try:
            return parse(raw)
        except (ValueError, TypeError):
            raise ConfigError(f"{name}={raw!r} is not valid: expected {accepts}") from None

    def text(self, name: str, default: str = "", required: bool = False) -> str:
        raw = self._get(name)
        if raw is None and required:
            raise ConfigError(f"{name} is required: set it to a local folder or a gs://bucket/prefix")
        return raw if raw is not None else default

    def uri(self, name: str, default: str = "", required: bool = False) -> str:
        """A local path or gs:// URI in its normal form (storage.normalise_uri); empty stays empty."""
        raw = self.text(name, default, required)
        if not raw:
            return raw
        try:
            return storage.normalise_uri(raw)
        except ValueError as problem:
            raise ConfigError(f"{name}={raw!r} is not valid: {problem}") from None

    def local_folder(self, name: str, default: Path) -> Path:
        """A folder on this machine, made absolute. A URI (gs:// or any other scheme://) is
        refused: taken as a path it would create a folder named 'gs:' in the working directory."""
        raw = self.text(name, str(default))
        if "://" in raw:
            raise ConfigError(f"{name}={raw!r} is not valid: expected a local folder (the job's "
                              "scratch space on this machine), not a URI")
        return Path(self.uri(name, str(default)))

    def integer(self, name: str, default: int, minimum: int) -> int:
        def parse(raw: str) -> int:
            value = int(raw)
            if value < minimum:
                raise ValueError
            return value

        return self._parse(name, default, f"an integer >= {minimum}", parse)

    def positive_float(self, name: str, default: float) -> float:
        def parse(raw: str) -> float:
            value = float(raw)
            if not value > 0 or value == float("inf"):
                raise ValueError
            return value

        return self._parse(name, default, "a positive number such as 1e-4", parse)

    def fraction(self, name: str, default: float, open_high: bool = False) -> float:
        def parse(raw: str) -> float:
            value = float(raw)
            if not (0 <= value < 1 if open_high else 0 <= value <= 1):
                raise ValueError
            return value

        accepts = "a number from 0 to below 1" if open_high else "a number from 0 to 1"
        return self._parse(name, default, accepts, parse)

    def flag(self, name: str, default: bool) -> bool:
        words = {"1": True, "true": True, "yes": True, "on": True,
                 "0": False, "false": False, "no": False, "off": False}
        return self._parse(name, default, "one of 1, 0, true, false, on, off",
                           lambda raw: words[raw.lower()] if raw.lower() in words else int("x"))

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        def parse(raw: str) -> str:
            if raw.lower() not in choices:
                raise ValueError
            return raw.lower()

        return self._parse(name, default, "one of " + ", ".join(choices), parse)

    def choice_float(self, name: str, default: float, choices: tuple[float, ...]) -> float:
        def parse(raw: str) -> float:
            value = float(raw)
            if value not in choices:
                raise ValueError
            return value

        return self._parse(name, default, "one of " + ", ".join(map(str, choices)), parse)

    def cache_budget(self, name: str, default: CacheBudget) -> CacheBudget:
        return self._parse(name, default, "a share of the free space such as 80%, or a size "
                           "such as 0, 500MB or 20GiB", CacheBudget.parse)

    def backbone(self, name: str, default: str) -> str:
        """A built-in backbone name, or a TF-Hub/Kaggle handle or SavedModel path of a feature vector."""
        def parse(raw: str) -> str:
            if raw.lower() in BACKBONES:
                return raw.lower()
            looks_like_handle = "://" in raw or raw.startswith(("/", "./")) or raw.count("/") >= 2
            if looks_like_handle:
                return raw
            raise ValueError

        accepts = ("one of " + ", ".join(BACKBONES)
                   + ", or a TF-Hub/Kaggle handle or SavedModel path of an image feature vector")
        return self._parse(name, default, accepts, parse)

    def weights(self, name: str, default: str) -> str:
        def parse(raw: str) -> str:
            if raw.lower() in ("imagenet", "none"):
                return raw.lower()
            if raw.endswith(".h5"):
                return storage.normalise_uri(raw)
            raise ValueError

        return self._parse(name, default,
                           "imagenet, none, or a path or gs:// URI of a Keras .h5 weights file", parse)

    def run_id(self, name: str) -> str:
        def parse(raw: str) -> str:
            if not RUN_ID_PATTERN.match(raw):
                raise ValueError
            return raw

        return self._parse(name, new_run_id(),
                           "letters, digits, '.', '_' or '-' (at most 128, no leading '.' or '-')", parse)
