"""TFDS builders for the training data, prepared as array_record, and `PreparedDataset`, which reads them with grain.

Prepare once (the command prints the folder to read from):

    python -m vdjax.data.tfds_builders --dataset=moving_shapes --config=tiny --data_dir=DIR
    python -m vdjax.data.tfds_builders --dataset=video_folder --manual_dir=MY_VIDEOS --data_dir=DIR

then train from it: `make_dataset(PreparedDataset("DIR/moving_shapes/tiny/1.0.0"), batch_size=..., ...)`.

- `moving_shapes` stores `make_clip(i, ...)` as example i (configs `tiny`, `tiny_by_kind` and `default`, see
  `MovingShapesConfig`).
- `video_folder` stores a user's folder of videos + captions file (the layout `VideoFolder` reads) given as TFDS's
  manual dir. Videos that fail to decode are skipped, counted in a warning and listed in the prepared dataset's
  metadata (`PreparedDataset(...).metadata["skipped"]`). One data_dir holds one prepared folder (`prepare` refuses
  to mix them up): use another data_dir for another folder.

Videos and masks are stored as zlib-compressed uint8 tensors: exact, and about 5x faster to decode than per-frame
PNG for about 1.5x its size (measured on moving_shapes). The first frame is not stored: it is `video[0]`, and the
pipeline takes the first frame of the clip it samples anyway. Examples keep their generation order (shuffling
happens in the grain pipeline).

Preparing and reading need `tensorflow-datasets` and `array_record` (the `data` extra) but not TensorFlow: TFDS
serialises tf.train.Example protos with its own copy of the protobuf and decodes them with numpy.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os

import numpy as np

if __name__ == "__main__":
    # `python -m` runs this file as `__main__`, but TFDS wants its builders in an importable module (it looks up
    # their package) and registered once: so run the command line from the imported module; it exits when done.
    from vdjax.data.tfds_builders import main

    main()

try:
    import tensorflow_datasets as tfds
except ImportError as e:
    raise ImportError("vdjax.data.tfds_builders needs tensorflow-datasets and array_record: "
                      "pip install -e '.[data]'") from e

from vdjax.data.moving_shapes import make_clip
from vdjax.data.video_folder import CAPTION_FILES, VideoFolder

log = logging.getLogger(__name__)


def _video_features(shape=(None, None, None)) -> dict:
    """video (F, H, W, 3) and mask (F, H, W) as zlib-compressed uint8, and the caption."""
    return {"video": tfds.features.Tensor(shape=(*shape, 3), dtype=np.uint8, encoding="zlib"),
            "mask": tfds.features.Tensor(shape=shape, dtype=np.uint8, encoding="zlib"),
            "caption": tfds.features.Text()}


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """What both builders share. Each writes its examples in generation order (`disable_shuffling`)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    # No code folder: TFDS would look for checksums next to it, and finding it needs the undeclared importlib_resources
    # on Python >= 3.9 (tensorflow/datasets#11212).
    code_path = None


@dataclasses.dataclass(eq=False)
class MovingShapesConfig(tfds.core.BuilderConfig):
    num_examples: int = 1000
    num_frames: int = 16
    size: int = 64
    seed: int = 0
    motion: str = "random"  # moving_shapes' MOTIONS: 'by_kind' moves each shape kind its own way


class MovingShapesBuilder(_Builder):
    """Example i is `make_clip(i, num_frames, size, seed, motion)` of the config, in order."""

    name = "moving_shapes"
    BUILDER_CONFIGS = [
        MovingShapesConfig(name="tiny", num_examples=8, num_frames=8, size=32,
                           description="8 clips of 8 frames at 32x32: tests and demos."),
        MovingShapesConfig(name="tiny_by_kind", num_examples=8, num_frames=8, size=32, motion="by_kind",
                           description="tiny, with squares moving right, circles down, triangles left."),
        MovingShapesConfig(name="default", description="1000 clips of 16 frames at 64x64 (MovingShapes' defaults)."),
    ]
    DEFAULT_CONFIG_NAME = "default"

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        return self.dataset_info_from_configs(
            description="Coloured shapes moving over textured backgrounds, with a caption and a subject mask.",
            features=tfds.features.FeaturesDict(_video_features((c.num_frames, c.size, c.size))),
            disable_shuffling=True)  # keeps example i = make_clip(i)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        c = self.builder_config
        for i in range(c.num_examples):
            clip = make_clip(i, num_frames=c.num_frames, size=c.size, seed=c.seed, motion=c.motion)
            yield i, {"video": clip["video"], "mask": clip["mask"], "caption": clip["caption"]}


class VideoFolderBuilder(_Builder):
    """A user's folder of videos, captions and optional masks (see `VideoFolder`), given as the manual dir."""

    name = "video_folder"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Pass your folder of videos as the manual dir (--manual_dir=FOLDER, or tfds.download.DownloadConfig("
        f"manual_dir=FOLDER)). It needs a captions file ({', '.join(CAPTION_FILES)}) with columns video,caption "
        "[,mask], paths relative to the folder; see vdjax/data/video_folder.py.")

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="Videos from a user's folder with their captions and optional subject masks.",
            features=tfds.features.FeaturesDict({**_video_features(), "has_mask": np.bool_,
                                                 "path": tfds.features.Text()}),
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(VideoFolder(os.fspath(dl_manager.manual_dir)))}

    def _generate_examples(self, source: VideoFolder):
        skipped = []
        for i, row in enumerate(source.rows):
            example = source[i]  # None when the video does not decode (VideoFolder logs which and why)
            if example is None:
                skipped.append(row["video"])
                continue
            yield i, {"video": example["video"], "mask": example["mask"], "caption": example["caption"],
                      "has_mask": example["has_mask"], "path": row["video"]}
        if len(skipped) == len(source.rows):
            raise ValueError(f"{source.root}: none of the {len(source.rows)} videos in {source.captions_path} "
                             "could be decoded; check that they play (e.g. with ffprobe) and re-encode them as mp4")
        if skipped:
            log.warning("video_folder: skipped %d of %d videos that did not decode: %s", len(skipped),
                        len(source.rows), ", ".join(skipped))
        # Written to metadata.json with the dataset.
        self.info.metadata.update(folder=os.path.abspath(source.root), skipped=skipped)


BUILDERS = {b.name: b for b in (MovingShapesBuilder, VideoFolderBuilder)}


def prepare(dataset: str, *, data_dir: str, config: str | None = None, manual_dir: str | None = None) -> str:
    """Prepares `dataset` ('moving_shapes' or 'video_folder') as array_record; returns the folder to read from."""
    if dataset not in BUILDERS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(BUILDERS)}")
    configs = BUILDERS[dataset].builder_configs
    if config is not None and config not in configs:
        have = f"the configs {', '.join(configs)}" if configs else "no configs"
        raise ValueError(f"{dataset} has {have}; got config {config!r}")
    if dataset == "video_folder":
        if not manual_dir:
            raise ValueError("video_folder needs the folder of videos. "
                             + VideoFolderBuilder.MANUAL_DOWNLOAD_INSTRUCTIONS)
        VideoFolder(manual_dir)  # checks the folder and captions now, with VideoFolder's messages
    builder = BUILDERS[dataset](config=config, data_dir=os.fspath(data_dir), file_format="array_record")
    if dataset == "video_folder":  # TFDS would silently reuse a folder prepared before in this data_dir
        done = os.path.join(builder.data_dir, "metadata.json")
        if os.path.isfile(done):
            with open(done) as f:
                before = json.load(f).get("folder")
            if before != os.path.abspath(manual_dir):
                raise ValueError(f"{builder.data_dir} already holds {before}, prepared before; pass another "
                                 f"--data_dir for {manual_dir}, or delete {builder.data_dir} to prepare it again")
    download_config = tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir) if manual_dir else None)
    builder.download_and_prepare(download_config=download_config)
    return os.fspath(builder.data_dir)


class PreparedDataset:
    """Random-access source (len, getitem) over a prepared split, in the form `make_dataset` takes.

    `path` is the folder holding dataset_info.json and the .array_record files (`prepare` returns it, e.g.
    DATA_DIR/moving_shapes/tiny/1.0.0). Examples: {'video' uint8 (F, H, W, 3), 'mask' uint8 (F, H, W),
    'caption' str, 'first_frame', 'has_mask'} plus any other stored feature ('path' for video_folder).
    """

    def __init__(self, path: str, split: str = "train"):
        import grain

        path = os.fspath(path)
        if not os.path.isfile(os.path.join(path, "dataset_info.json")):
            found = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(path, "**", "dataset_info.json"),
                                                                 recursive=True))
            hint = (f"; prepared datasets under it: {', '.join(found)}" if found else
                    "; prepare one with: python -m vdjax.data.tfds_builders --dataset=moving_shapes --config=tiny "
                    f"--data_dir={path}")
            raise ValueError(f"{path}: not a prepared TFDS dataset (no dataset_info.json){hint}")
        info = tfds.builder_from_directory(path).info
        if info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
            raise ValueError(f"{path} was prepared as {info.file_format}, which grain cannot read at random; prepare "
                             "it again with file_format='array_record' (as `prepare` and the command line do)")
        if split not in info.splits:
            raise ValueError(f"{path} has no split {split!r}; it has {', '.join(info.splits)}")
        self.path, self.split, self.features = path, split, info.features
        self.metadata = dict(info.metadata or {})
        self._records = grain.sources.ArrayRecordDataSource([os.fspath(p) for p in info.splits[split].filepaths])

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        example = self.features.deserialize_example_np(self._records[index])
        for key, value in example.items():
            if isinstance(value, bytes):  # Text features come back as UTF-8 bytes
                example[key] = value.decode("utf-8")
        example["first_frame"] = example["video"][0]
        example["has_mask"] = bool(example.get("has_mask", True))
        return example

    def __repr__(self) -> str:
        return f"PreparedDataset({self.path!r}, split={self.split!r}, {len(self)} examples)"


def main():
    """The command line (see the module docstring); exits when done."""
    from absl import app, flags

    flags.DEFINE_enum("dataset", None, list(BUILDERS), "which dataset to prepare", required=True)
    flags.DEFINE_string("data_dir", None, "where TFDS writes the prepared dataset", required=True)
    flags.DEFINE_string("config", None, "builder config (moving_shapes: tiny or default)")
    flags.DEFINE_string("manual_dir", None, "video_folder: the folder of videos and its captions file")
    FLAGS = flags.FLAGS

    def run(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
        path = prepare(FLAGS.dataset, data_dir=FLAGS.data_dir, config=FLAGS.config, manual_dir=FLAGS.manual_dir)
        print(f"prepared {path}\nread it with vdjax.data.tfds_builders.PreparedDataset({path!r})")

    app.run(run)

