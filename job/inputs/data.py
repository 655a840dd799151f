"""Data: finds the labelled images in a local folder, splits them, and feeds them through tf.data.

Layouts: `<class>/<image>` at the root (split here, seeded and stratified), or the same under
`train/`, and optionally `validation/` and `test/` (used as they are). Classes are the sorted
sub-folder names of the training folder. Every file is checked once with the same decoder the
pipeline uses, so unusable files are skipped and named with a reason instead of failing mid-epoch.
Symbolic links are followed, but each real file is counted once, in one class and one split
(the walk is edge/files.py, shared with the edge predictor).
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import random
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tensorflow as tf

from common.progress import Progress
from edge.files import Finder, file_problem, real_path, relative
from edge.images import ImageError, load_image
from job.inputs.shard import EVERYTHING, Shard

log = logging.getLogger("job")

SPLITS = ("train", "validation", "test")
FILL_BATCH = 256  # examples per progress count while a cache fills


class DataError(ValueError):
    """The data set cannot be trained on; the message names the folder or class at fault."""


@dataclasses.dataclass
class Split:
    paths: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.paths)

    def class_counts(self, class_names: list[str]) -> dict[str, int]:
        return dict(zip(class_names, self.label_counts(len(class_names)).tolist()))

    def label_counts(self, num_classes: int) -> np.ndarray:
        """Images per class label, 0 to num_classes - 1."""
        return np.bincount(np.asarray(self.labels, dtype=np.int64), minlength=num_classes)


@dataclasses.dataclass
class DataSet:
    class_names: list[str]
    train: Split
    validation: Split
    test: Split
    skipped: dict[str, str]  # file path (relative to the data root) -> reason
    notes: list[str]  # how the layout was read, for the log and metrics.json
    root: Path  # the folder the splits' paths were found under

    def counts(self) -> dict[str, dict[str, int]]:
        return {name: getattr(self, name).class_counts(self.class_names) for name in SPLITS}


def load_dataset(root: Path, image_size: int, validation_split: float, test_split: float,
                 seed: int, workers: int = 8, shard: Shard = EVERYTHING,
                 require_every_class: bool = True) -> DataSet:
    """Discovers, checks and splits the images under root: of each class folder, the files dealt
    to shard (job/inputs/shard.py), all of them by default. A worker that holds only its part of the
    data (a shard, or a pull of one) passes require_every_class=False: a class may have no image
    in its part, and the check is made on the whole (job/cluster/workers.py)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"DATA_URI {root}: is not a directory of class folders")
    notes: list[str] = []
    skipped: dict[str, str] = {}
    split_dirs = {name: root / name for name in SPLITS if _has_class_folders(root / name)}
    for name in SPLITS:
        if (root / name).is_dir() and name not in split_dirs:
            notes.append(f"{name}/ holds no class folders with files; ignored")
    train_root = split_dirs.get("train", root)
    class_names = _class_names(train_root)
    if len(class_names) < 2:
        raise DataError(f"{train_root}: found {len(class_names)} class folder(s) "
                        f"{class_names}; need at least two, one per class")

    split_roots = [train_root] + [split_dirs[name] for name in SPLITS[1:] if name in split_dirs]
    class_dirs = [folder / name for folder in split_roots for name in class_names]
    finder = _ClassFinder(root, class_dirs, skipped)

    def collect(split_root: Path) -> Split:
        unknown = sorted(set(_class_names(split_root)) - set(class_names))
        if unknown:
            raise DataError(f"{split_root}: class folders {unknown} are not in the training classes "
                            f"{class_names}")
        paths, labels = [], []
        for label, name in enumerate(class_names):
            for path in _image_candidates(split_root / name, finder, root, skipped,
                                          lambda names: shard.select(names, seed)):
                paths.append(path)
                labels.append(label)
        return _checked(Split(paths, labels), image_size, root, skipped, workers)

    train = collect(train_root)
    if require_every_class:
        _require_every_class(train, class_names, train_root, root, skipped)
    validation = collect(split_dirs["validation"]) if "validation" in split_dirs else None
    test = collect(split_dirs["test"]) if "test" in split_dirs else None
    if validation is None:
        train, validation = stratified_split(train, validation_split, seed)
        notes.append(f"validation: {validation_split:.0%} of the training images, stratified, seed {seed}")
    if test is None:
        train, test = stratified_split(train, test_split, seed + 1)
        notes.append(f"test: {test_split:.0%} of the training images, stratified, seed {seed + 1}")
    if require_every_class:
        _require_every_class(train, class_names, train_root, root, skipped)
    return DataSet(class_names, train, validation, test, skipped, notes, root)


def load_as_split_by(workers: int, root: Path, image_size: int, validation_split: float,
                     test_split: float, seed: int) -> DataSet:
    """The data set split as a run of that many workers split it: each worker split its own shard
    (job/inputs/shard.py) of every class folder, so a test image of such a run is one that a worker put
    in its test split. One worker: load_dataset."""
    if workers == 1:
        return load_dataset(root, image_size, validation_split, test_split, seed)
    parts = [load_dataset(root, image_size, validation_split, test_split, seed,
                          shard=Shard(index, workers), require_every_class=False)
             for index in range(workers)]
    merged = {name: Split([p for part in parts for p in getattr(part, name).paths],
                          [l for part in parts for l in getattr(part, name).labels])
              for name in SPLITS}
    first = parts[0]
    skipped = {path: why for part in parts for path, why in part.skipped.items()}
    _require_every_class(merged["train"], first.class_names, root, root, skipped)
    return DataSet(first.class_names, **merged, skipped=skipped, notes=first.notes,
                   root=first.root)


def stratified_split(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Moves `fraction` of each class (at least one image when fraction > 0) into a second split."""
    keep, take = Split([], []), Split([], [])
    rng = random.Random(seed)
    for label in sorted(set(split.labels)):
        paths = sorted(p for p, l in zip(split.paths, split.labels) if l == label)
        rng.shuffle(paths)
        count = 0 if fraction == 0 else max(1, round(len(paths) * fraction))
        count = min(count, len(paths) - 1)
        for index, path in enumerate(paths):
            target = take if index < count else keep
            target.paths.append(path)
            target.labels.append(label)
    return keep, take


def image_dataset(split: Split, image_size: int, batch_size: int, shuffle: bool = False,
                  seed: int = 0, cache_file: str | None = None) -> tf.data.Dataset:
    """Batches of (float32 RGB 0-255 images, labels), decoded in parallel by the shared decoder.

    With cache_file the decoded uint8 images are written to that file once and read back from it
    afterwards; memory stays flat whatever the size of the data set.
    """
    def decode(path):
        image = tf.numpy_function(lambda p: load_image(p.decode(), image_size), [path], tf.uint8)
        image.set_shape((image_size, image_size, 3))
        return image

    images = tf.data.Dataset.from_tensor_slices(split.paths).map(
        decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    labels = tf.data.Dataset.from_tensor_slices(np.asarray(split.labels, dtype=np.int32))
    dataset = tf.data.Dataset.zip((images, labels))
    if cache_file:
        dataset = cached(dataset, Path(cache_file), f"decoding {Path(cache_file).name} images")
    if shuffle:
        dataset = dataset.shuffle(min(len(split), 2048), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size).map(lambda x, y: (tf.cast(x, tf.float32), y))
    return dataset.prefetch(tf.data.AUTOTUNE)


def cached(examples: tf.data.Dataset, path: Path, step: str) -> tf.data.Dataset:
    """The examples read back from a file that one full pass fills now, logging its progress as
    step, unless a complete one is there already (an earlier attempt's).

    Not tf.data's own file cache: Keras stops at the known number of batches without reading the
    end of the data, and tf.data throws away a cache that was not read to the end; and TF 2.21's
    cache writer logs "the calling iterator did not fully read the dataset being cached" even
    after a complete pass (its destructor looks for the per-shard index that the completed cache
    has just merged away)."""
    count = int(examples.cardinality())
    if not path.exists():
        write_records(path, examples.batch(FILL_BATCH), count, step)
    return read_records(path, examples.element_spec, count)


# A small file format for examples computed once, by tf.data or by a model on the main thread:
# one TFRecord per batch, each component of the batch a serialized tensor under its position.

def write_records(path: Path, batches: Iterable[tuple[tf.Tensor, ...]], count: int,
                  step: str) -> None:
    """Writes each batch (a tuple of tensors of one batch size) to path as one record, logging
    progress as step; a file killed half-written is left under a temporary name that the next
    write overwrites, so path only ever names a complete file."""
    partial = path.with_name(f"{path.name}.partial")
    with tf.io.TFRecordWriter(str(partial)) as writer, \
            Progress(step, count, "examples", log) as progress:
        for batch in batches:
            writer.write(tf.train.Example(features=tf.train.Features(feature={
                str(position): tf.train.Feature(bytes_list=tf.train.BytesList(
                    value=[tf.io.serialize_tensor(tensor).numpy()]))
                for position, tensor in enumerate(batch)})).SerializeToString())
            progress.advance(int(batch[0].shape[0]))
    partial.replace(path)


def read_records(path: Path, specs: tuple[tf.TensorSpec, ...], count: int) -> tf.data.Dataset:
    """The count examples, one by one, of a file write_records wrote; specs: each component's
    shape (of one example) and dtype."""
    schema = {str(position): tf.io.FixedLenFeature([], tf.string) for position in range(len(specs))}

    def parse(record):
        batch = tf.io.parse_single_example(record, schema)
        return tuple(tf.ensure_shape(tf.io.parse_tensor(batch[str(position)], spec.dtype),
                                     [None, *spec.shape]) for position, spec in enumerate(specs))

    examples = tf.data.TFRecordDataset(str(path)).map(parse, num_parallel_calls=tf.data.AUTOTUNE,
                                                     deterministic=True).unbatch()
    return examples.apply(tf.data.experimental.assert_cardinality(count))


def shuffle_buffer(examples: tf.data.Dataset, max_bytes: int = 256 * 2**20) -> int:
    """A shuffle buffer as large as the data set, or as fits in max_bytes of memory."""
    features = examples.element_spec[0]
    example_bytes = int(np.prod(features.shape)) * features.dtype.size
    count = int(examples.cardinality())
    limit = max(256, max_bytes // max(example_bytes, 1))
    return limit if count < 0 else max(1, min(count, limit))


def is_imbalanced(counts, ratio: float = 1.5) -> bool:
    """Whether the largest class outnumbers the smallest more than ratio times (counts: images
    per class): where CLASS_WEIGHTS=auto weights the classes (and the probe balances them)."""
    counts = np.asarray(counts)
    return counts.max() > ratio * counts.min()


def class_weights(counts) -> dict[int, float]:
    """Balanced weights (n / (k * count)) for these images per class, so each class counts
    equally in the loss."""
    counts = np.asarray(counts)
    return {label: float(counts.sum() / (len(counts) * count)) for label, count in enumerate(counts)}


def _has_class_folders(path: Path) -> bool:
    return path.is_dir() and any(
        child.is_dir() and not child.name.startswith(".")
        and any(_ClassFinder(path, [], {}).walk(child))
        for child in path.iterdir())


def _class_names(root: Path) -> list[str]:
    """The sorted names of the class folders under root. A name holding a control character or
    a line break (a newline, a tab, U+2028) cannot be a label: labels.txt holds one class a line
    and the predictor prints one tab-separated line an image. Such a folder is refused, named,
    rather than skipped: skipping it would train a model that silently lacks one of the classes."""
    names = sorted(child.name for child in root.iterdir()
                   if child.is_dir() and not child.name.startswith(".") and child.name not in SPLITS)
    for name in names:
        if any(unicodedata.category(character) in ("Cc", "Zl", "Zp") for character in name):
            raise DataError(f"{root}: the class folder {name!r} has a control character or line "
                            "break in its name, which cannot be a label (labels.txt holds one "
                            "class a line); rename the folder")
    return names


class _ClassFinder(Finder):
    """The shared walk (edge/files.py), keeping each class's images in their class.

    A class folder that is a link may lead to a folder elsewhere, but not loop. A link that leads
    into another class folder (or to a folder holding one) is skipped with its reason: no image
    gets another class's label or lands in two splits. The first path found to a file is kept
    (train before validation and test).
    """

    def __init__(self, root: Path, class_dirs: list[Path], skipped: dict[str, str]):
        super().__init__(root, skipped)
        self.class_dirs = {real_path(folder): folder for folder in class_dirs}  # real -> as named

    def walk(self, class_dir: Path) -> Iterator[Path]:
        if class_dir.is_symlink():
            problem = self.link_problem(class_dir, real_path(class_dir),
                                        above=(real_path(class_dir.parent),))
            if problem:
                self.skipped[relative(class_dir, self.root)] = problem
                return
        yield from super().walk(class_dir)

    def link_target_problem(self, target: Path, own: Path, folder: bool) -> str | None:
        """Why a link to target from the class folder own would give another folder's images
        own's label (folder: a link to a folder, which may hold class folders), or None."""
        for real, named in self.class_dirs.items():
            if real == own:
                continue
            if target.is_relative_to(real):
                return f"symbolic link into another class folder: {relative(named, self.root)}"
            if folder and real.is_relative_to(target):
                return ("symbolic link to a folder holding another class folder: "
                        f"{relative(named, self.root)}")
        return None


def _image_candidates(class_dir: Path, finder: _ClassFinder, root: Path, skipped: dict[str, str],
                      select: Callable[[list[str]], set[str]]) -> list[str]:
    """Every file under a class folder that select keeps (given all of them, relative to root),
    nested folders included; hidden, empty and unreachable files (a symbolic link to nothing, a
    file gone since the listing), and files already listed by another path or in another class
    folder, are skipped."""
    candidates = []
    walked = {relative(path, root): path for path in finder.walk(class_dir)}
    chosen = select(list(walked))
    for path in (path for name, path in walked.items() if name in chosen):
        reason = file_problem(path) or finder.claim(path, class_dir)
        if reason is None:
            candidates.append(str(path))
        else:
            skipped[relative(path, root)] = reason
    return candidates


def _checked(split: Split, image_size: int, root: Path, skipped: dict[str, str],
             workers: int) -> Split:
    """Keeps the files the shared decoder can read; records why each other one was skipped."""
    def problem(path: str) -> str | None:
        try:
            load_image(path, image_size)
            return None
        except ImageError as error:
            return str(error)

    with ThreadPoolExecutor(workers) as pool:
        problems = list(pool.map(problem, split.paths))
    kept = Split([], [])
    for path, label, reason in zip(split.paths, split.labels, problems):
        if reason is None:
            kept.paths.append(path)
            kept.labels.append(label)
        else:
            skipped[relative(Path(path), root)] = reason
    return kept


def _require_every_class(split: Split, class_names: list[str], folder: Path, root: Path,
                         skipped: dict[str, str]) -> None:
    for name, count in split.class_counts(class_names).items():
        if count == 0:
            raise DataError(f"{folder / name}: class {name!r} has no usable image: "
                            f"{_skipped_summary(skipped, relative(folder / name, root))}")


def _skipped_summary(skipped: dict[str, str], folder: str) -> str:
    """One line on the files skipped under folder, e.g. '3 files skipped (2 not an image (unknown
    format), 1 empty file (0 bytes)), e.g. cats/a.txt': the error is raised before the skipped
    files are logged, so it must say why by itself."""
    paths = sorted(path for path in skipped if Path(path).is_relative_to(folder))
    if not paths:
        return "the folder holds no files"
    kinds = collections.Counter(skipped[path].partition(":")[0] for path in paths)
    listed = [f"{count} {kind}" for kind, count in kinds.most_common(3)]
    if len(kinds) > 3:
        listed.append(f"{sum(count for _, count in kinds.most_common()[3:])} for other reasons")
    files = "1 file" if len(paths) == 1 else f"{len(paths)} files"
    return f"{files} skipped ({', '.join(listed)}), e.g. {paths[0]}"
