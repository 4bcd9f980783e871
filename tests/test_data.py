"""Training data: the moving-shapes clips, the video-folder source, and the grain pipeline (order, shards, resume)."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest

pytest.importorskip("grain")

from vdjax.data.moving_shapes import COLOURS, KIND_VELOCITY, MovingShapes, make_clip  # noqa: E402
from vdjax.data.pipeline import make_dataset  # noqa: E402
from vdjax.data.video_folder import VideoFolder  # noqa: E402
from vdjax.io.video import write_video  # noqa: E402

SMALL = dict(batch_size=2, num_frames=4, size=32, seed=3, shard_index=0, shard_count=1, num_threads=2)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["caption"] == y["caption"]
        for k in ("video", "first_frame", "mask", "index"):
            np.testing.assert_array_equal(x[k], y[k])


def test_make_clip_is_deterministic_and_seed_dependent():
    a, b = make_clip(5, num_frames=8, size=32, seed=1), make_clip(5, num_frames=8, size=32, seed=1)
    for k in ("video", "first_frame", "mask"):
        np.testing.assert_array_equal(a[k], b[k])
    assert a["caption"] == b["caption"]
    assert not np.array_equal(a["video"], make_clip(6, num_frames=8, size=32, seed=1)["video"])
    assert not np.array_equal(a["video"], make_clip(5, num_frames=8, size=32, seed=2)["video"])


def test_clip_content():
    for index in range(6):
        clip = make_clip(index, num_frames=8, size=48, seed=0)
        assert clip["video"].shape == (8, 48, 48, 3) and clip["video"].dtype == np.uint8
        assert clip["mask"].shape == (8, 48, 48) and clip["mask"].dtype == np.uint8
        np.testing.assert_array_equal(clip["first_frame"], clip["video"][0])
        # The shapes move: the subject mask's centroid shifts between the first and the last frame.
        centroid = [np.argwhere(m).mean(0) for m in (clip["mask"][0], clip["mask"][-1])]
        assert np.abs(centroid[1] - centroid[0]).max() > 1.0
        # Every colour drawn is named, and every colour named is drawn (on the mask) in the first frame.
        named = {c for c in COLOURS if c in clip["caption"]}
        assert 1 <= len(named) <= 3 and "moving" in clip["caption"]
        pixels = clip["video"][0][clip["mask"][0] == 1]
        drawn = {c for c, rgb in COLOURS.items() if (pixels == rgb).all(-1).any()}
        assert drawn == named, (clip["caption"], drawn)
        # The background is textured, not flat.
        assert clip["video"][0][clip["mask"][0] == 0].std() > 2.0


def test_motion_by_kind_moves_each_kind_its_own_way():
    """motion='by_kind': the first frame of 'random', then squares right, circles down, triangles left, 0.04 frame
    sizes per frame, as the caption says; a single shape's mask moves exactly that far before any bounce."""
    size, checked = 64, 0
    for index in range(60):
        a = make_clip(index, num_frames=4, size=size, seed=3)
        b = make_clip(index, num_frames=4, size=size, seed=3, motion="by_kind")
        np.testing.assert_array_equal(a["first_frame"], b["first_frame"])
        for kind, word in (("square", "right"), ("circle", "down"), ("triangle", "left")):
            assert f"{kind} moving" not in b["caption"] or f"{kind} moving {word}" in b["caption"], b["caption"]
        if " and " in b["caption"]:
            continue
        kind = b["caption"].split()[2]
        ys, xs = np.nonzero(b["mask"][0])
        dy, dx = np.asarray(KIND_VELOCITY[kind]) * size
        reach = 3 * max(abs(dy), abs(dx)) + 1  # how far it goes by frame 3
        if min(ys.min(), xs.min()) - reach < 0 or max(ys.max(), xs.max()) + reach >= size:
            continue  # near a border: it may bounce within these frames
        shift = np.argwhere(b["mask"][3]).mean(0) - np.argwhere(b["mask"][0]).mean(0)
        np.testing.assert_allclose(shift, (3 * dy, 3 * dx), atol=1.0)  # masks are whole pixels
        checked += 1
    assert checked >= 3
    with pytest.raises(ValueError, match="choose one of random, by_kind"):
        make_clip(0, motion="sideways")
    with pytest.raises(ValueError, match="choose one of random, by_kind"):
        MovingShapes(4, motion="sideways")


def test_moving_shapes_source():
    source = MovingShapes(7, num_frames=4, size=16, seed=2)
    assert len(source) == 7
    np.testing.assert_array_equal(source[3]["video"], make_clip(3, num_frames=4, size=16, seed=2)["video"])
    with pytest.raises(IndexError):
        source[7]


def test_batches_shapes_ranges_and_determinism():
    source = MovingShapes(8, num_frames=10, size=40, seed=0)  # 40 -> 32: the resize path
    batches = _take(iter(make_dataset(source, frame_stride=2, **SMALL)), 3)
    b = batches[0]
    assert b["video"].shape == (2, 4, 32, 32, 3) and b["video"].dtype == np.float32
    assert b["first_frame"].shape == (2, 32, 32, 3) and b["mask"].shape == (2, 4, 32, 32)
    assert b["mask"].dtype == np.float32 and set(np.unique(b["mask"])) <= {0.0, 1.0}
    assert -1.0 <= b["video"].min() and b["video"].max() <= 1.0 and b["video"].std() > 0.1
    np.testing.assert_array_equal(b["first_frame"], b["video"][:, 0])
    assert len(b["caption"]) == 2 and all(isinstance(c, str) and c for c in b["caption"])
    _assert_batches_equal(batches, _take(iter(make_dataset(source, frame_stride=2, **SMALL)), 3))
    other = _take(iter(make_dataset(source, frame_stride=2, **{**SMALL, "seed": 4})), 3)
    assert any(not np.array_equal(x["index"], y["index"]) for x, y in zip(batches, other))


def test_two_hosts_see_disjoint_halves_that_cover_each_epoch():
    source = MovingShapes(8, num_frames=4, size=16, seed=0)
    args = {**SMALL, "size": 16, "num_epochs": 2}
    seen = [[int(i) for b in make_dataset(source, **{**args, "shard_index": h, "shard_count": 2})
             for i in b["index"]] for h in range(2)]
    assert [len(s) for s in seen] == [8, 8]  # 2 epochs x 4 examples each: hosts stay in step
    for epoch in range(2):
        halves = [set(s[4 * epoch:4 * epoch + 4]) for s in seen]
        assert not halves[0] & halves[1] and halves[0] | halves[1] == set(range(8))
    assert seen[0][:4] != seen[0][4:]  # each epoch is shuffled anew


def test_caption_dropout_at_zero_and_one():
    source = MovingShapes(4, num_frames=4, size=16, seed=0)
    args = {**SMALL, "size": 16}
    kept = next(iter(make_dataset(source, caption_dropout=0.0, **args)))
    dropped = next(iter(make_dataset(source, caption_dropout=1.0, **args)))
    assert all(kept["caption"]) and dropped["caption"] == ["", ""]
    np.testing.assert_array_equal(kept["video"], dropped["video"])  # dropout touches only the caption


def test_iterator_state_round_trip():
    source = MovingShapes(6, num_frames=6, size=16, seed=0)
    args = {**SMALL, "size": 16}
    it = iter(make_dataset(source, frame_stride=2, **args))
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint would store
    expected = _take(it, 2)  # crosses into the second epoch (3 batches per epoch)
    fresh = iter(make_dataset(source, frame_stride=2, **args))
    fresh.set_state(state)
    _assert_batches_equal(_take(fresh, 2), expected)


@pytest.fixture
def folder(tmp_path):
    for i, name in enumerate(("a.mp4", "b.gif")):
        write_video(make_clip(i, num_frames=6, size=32, seed=0)["video"], str(tmp_path / name))
    (tmp_path / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 4)
    mask = make_clip(1, num_frames=6, size=32, seed=0)["mask"][..., None].repeat(3, -1) * 255
    write_video(mask, str(tmp_path / "b_mask"))  # a folder of PNG frames
    return tmp_path


ROWS = [dict(video="a.mp4", caption="clip a"), dict(video="bad.mp4", caption="broken"),
        dict(video="b.gif", caption="clip b, with a comma", mask="b_mask")]


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_video_folder_skips_and_counts_a_corrupt_video(folder, kind, caplog):
    if kind == "csv":
        lines = ["video,caption,mask"] + [f'{r["video"]},"{r["caption"]}",{r.get("mask", "")}' for r in ROWS]
    else:
        lines = [json.dumps(r) for r in ROWS]
    (folder / f"captions.{kind}").write_text("\n".join(lines) + "\n")
    source = VideoFolder(str(folder))
    assert len(source) == 3 and source[0]["video"].shape == (6, 32, 32, 3)
    b = source[2]
    assert b["caption"] == "clip b, with a comma" and b["has_mask"]
    np.testing.assert_array_equal(b["mask"], make_clip(1, num_frames=6, size=32, seed=0)["mask"])
    with caplog.at_level(logging.WARNING):
        batches = list(make_dataset(source, **{**SMALL, "size": 16, "num_epochs": 2}))
    assert source.num_failed == 1 and "bad.mp4" in caplog.text
    indices = [int(i) for b in batches for i in b["index"]]
    assert sorted(indices) == [0, 0, 2, 2]  # 2 epochs of the 2 good videos
    assert {c for b in batches for c in b["caption"]} == {"clip a", "clip b, with a comma"}
    assert batches[0]["video"].shape == (2, 4, 16, 16, 3)


def test_video_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="no videos and no captions file"):
        VideoFolder(str(tmp_path))
    with pytest.raises(ValueError, match="no such folder"):
        VideoFolder(str(tmp_path / "nope"))
    (tmp_path / "captions.csv").write_text("video,caption\n")
    with pytest.raises(ValueError, match="no rows"):
        VideoFolder(str(tmp_path))
    (tmp_path / "captions.csv").write_text("video,caption\nmissing.mp4,x\nalso.gif,y\n")
    with pytest.raises(ValueError, match="2 files missing.*also.gif, missing.mp4"):
        VideoFolder(str(tmp_path))
    (tmp_path / "captions.csv").write_text("clip,text\na.mp4,x\n")
    with pytest.raises(ValueError, match="needs 'video' and 'caption'"):
        VideoFolder(str(tmp_path))


def test_video_folder_feeds_the_trainer_resumably(folder):
    """The grain stream as the trainer sees it: videos in [-1, 1] and token ids, with a resumable state."""
    from vdjax.train.feed import TokenizedBatches

    (folder / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS))
    tokenize = lambda captions: np.asarray([[len(c)] * 77 for c in captions])
    make = lambda: TokenizedBatches(iter(make_dataset(VideoFolder(str(folder)), batch_size=2, num_frames=4, size=16,
                                                      seed=0)), tokenize)
    stream = make()
    first = next(stream)
    assert first["video"].shape == (2, 4, 16, 16, 3) and first["input_ids"].shape == (2, 77)
    assert first["video"].min() >= -1 and first["video"].max() <= 1
    state = json.loads(json.dumps(stream.get_state()))
    expected = next(stream)
    again = make()
    again.set_state(state)
    resumed = next(again)
    assert all(np.array_equal(resumed[k], expected[k]) for k in expected)
