"""TFDS builders prepared as array_record and read back through grain: exact round trips, the pipeline, bad input."""
from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("grain")
pytest.importorskip("tensorflow_datasets")

from vdjax.data.moving_shapes import MovingShapes, make_clip  # noqa: E402
from vdjax.data.pipeline import make_dataset  # noqa: E402
from vdjax.data.tfds_builders import MovingShapesBuilder, PreparedDataset, prepare  # noqa: E402
from vdjax.io.video import read_video, write_video  # noqa: E402

TINY = MovingShapesBuilder.builder_configs["tiny"]
SMALL = dict(batch_size=2, num_frames=4, size=16, seed=3, shard_index=0, shard_count=1, num_threads=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """moving_shapes/tiny prepared through the command line; the folder it prints."""
    data_dir = tmp_path_factory.mktemp("tfds")
    run = subprocess.run([sys.executable, "-m", "vdjax.data.tfds_builders", "--dataset=moving_shapes",
                          "--config=tiny", f"--data_dir={data_dir}"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    path = str(data_dir / "moving_shapes" / "tiny" / "1.0.0")
    assert f"prepared {path}" in run.stdout
    return path


def test_moving_shapes_reads_back_exactly(tiny):
    source = PreparedDataset(tiny)
    assert len(source) == TINY.num_examples == 8
    for i in range(len(source)):
        got, want = source[i], make_clip(i, num_frames=TINY.num_frames, size=TINY.size, seed=TINY.seed)
        assert got["caption"] == want["caption"] and got["has_mask"]
        for k in ("video", "first_frame", "mask"):
            assert got[k].dtype == np.uint8
            np.testing.assert_array_equal(got[k], want[k])
    with pytest.raises(IndexError):
        source[len(source)]


def test_moving_shapes_by_kind_config_stores_that_motion(tmp_path):
    """Config tiny_by_kind: make_clip(i, motion='by_kind'), not the random-motion clips (same first frames)."""
    config = MovingShapesBuilder.builder_configs["tiny_by_kind"]
    source = PreparedDataset(prepare("moving_shapes", config="tiny_by_kind", data_dir=str(tmp_path)))
    assert len(source) == config.num_examples
    moved = False
    for i in range(len(source)):
        want = make_clip(i, num_frames=config.num_frames, size=config.size, seed=config.seed, motion="by_kind")
        drawn = make_clip(i, num_frames=config.num_frames, size=config.size, seed=config.seed)  # random motion
        np.testing.assert_array_equal(source[i]["video"], want["video"])
        assert source[i]["caption"] == want["caption"]
        moved |= not np.array_equal(want["video"], drawn["video"])
    assert moved


def test_pipeline_over_prepared_equals_pipeline_over_clips(tiny):
    prepared = list(make_dataset(PreparedDataset(tiny), num_epochs=1, frame_stride=2, **SMALL))
    on_the_fly = list(make_dataset(MovingShapes(TINY.num_examples, num_frames=TINY.num_frames, size=TINY.size),
                                   num_epochs=1, frame_stride=2, **SMALL))
    assert len(prepared) == 4 and prepared[0]["video"].shape == (2, 4, 16, 16, 3)
    for a, b in zip(prepared, on_the_fly):
        assert a["caption"] == b["caption"]
        for k in ("video", "first_frame", "mask", "has_mask", "index"):
            np.testing.assert_array_equal(a[k], b[k])


def test_reader_errors(tiny, tmp_path):
    with pytest.raises(ValueError, match="not a prepared TFDS dataset.*python -m vdjax.data.tfds_builders"):
        PreparedDataset(str(tmp_path))
    parent = tiny.rsplit("/", 3)[0]  # the data_dir: names the prepared folder below it
    with pytest.raises(ValueError, match=f"prepared datasets under it: {tiny}"):
        PreparedDataset(parent)
    with pytest.raises(ValueError, match="no split 'test'; it has train"):
        PreparedDataset(tiny, split="test")


@pytest.fixture
def folder(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(2):
        write_video(make_clip(i, num_frames=6, size=24, seed=1)["video"], str(videos / f"{i}.mp4"))
    mask = make_clip(1, num_frames=6, size=24, seed=1)["mask"][..., None].repeat(3, -1) * 255
    write_video(mask, str(videos / "1_mask"))  # a folder of PNG frames
    (videos / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 4)
    rows = [dict(video="0.mp4", caption="clip zero"), dict(video="bad.mp4", caption="broken"),
            dict(video="1.mp4", caption="clip one", mask="1_mask")]
    (videos / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return videos


def test_video_folder_skips_and_counts_a_corrupt_video(folder, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        path = prepare("video_folder", data_dir=str(tmp_path / "tfds"), manual_dir=str(folder))
    assert "skipped 1 of 3 videos that did not decode: bad.mp4" in caplog.text
    source = PreparedDataset(path)
    assert len(source) == 2 and source.metadata["skipped"] == ["bad.mp4"]
    for i, name in enumerate(("0.mp4", "1.mp4")):
        np.testing.assert_array_equal(source[i]["video"], read_video(str(folder / name)))  # the decoded frames
        assert source[i]["path"] == name
    assert source[0]["caption"] == "clip zero" and not source[0]["has_mask"] and source[0]["mask"].all()
    assert source[1]["caption"] == "clip one" and source[1]["has_mask"]
    np.testing.assert_array_equal(source[1]["mask"], make_clip(1, num_frames=6, size=24, seed=1)["mask"])
    batch = next(iter(make_dataset(source, **SMALL)))
    assert batch["video"].shape == (2, 4, 16, 16, 3) and sorted(batch["caption"]) == ["clip one", "clip zero"]
    np.testing.assert_array_equal(batch["has_mask"], [source[int(i)]["has_mask"] for i in batch["index"]])
    # Preparing again reuses the data; another folder into the same data_dir is refused, not silently mixed up.
    assert prepare("video_folder", data_dir=str(tmp_path / "tfds"), manual_dir=str(folder)) == path
    other = tmp_path / "other"
    other.mkdir()
    (other / "0.mp4").write_bytes((folder / "0.mp4").read_bytes())
    (other / "captions.csv").write_text("video,caption\n0.mp4,clip zero\n")
    with pytest.raises(ValueError, match=f"already holds {folder}, prepared before; pass another --data_dir"):
        prepare("video_folder", data_dir=str(tmp_path / "tfds"), manual_dir=str(other))


def test_video_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no videos and no captions file; add one of captions.csv"):
        prepare("video_folder", data_dir=str(tmp_path / "tfds"), manual_dir=str(empty))
    with pytest.raises(ValueError, match="video_folder needs the folder of videos.*--manual_dir"):
        prepare("video_folder", data_dir=str(tmp_path / "tfds"))
    with pytest.raises(ValueError, match="unknown dataset 'shapes'; choose one of moving_shapes, video_folder"):
        prepare("shapes", data_dir=str(tmp_path / "tfds"))
    with pytest.raises(ValueError,
                       match="moving_shapes has the configs tiny, tiny_by_kind, default; got config 'huge'"):
        prepare("moving_shapes", config="huge", data_dir=str(tmp_path / "tfds"))
    (empty / "bad.mp4").write_bytes(b"not a video")
    (empty / "captions.csv").write_text("video,caption\nbad.mp4,broken\n")
    with pytest.raises(ValueError, match="none of the 1 videos .* could be decoded"):
        prepare("video_folder", data_dir=str(tmp_path / "tfds"), manual_dir=str(empty))
