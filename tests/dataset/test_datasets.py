import numpy as np
import pytest

from dataset.datasets import VariableVideoTextDataset, collate_batch, read_meta_csv
from dataset.sampler import FixedSizeBatchSampler
from utils.media import encode_mp4
from utils.errors import UserError


def numbered_video(path, num_frames, height=32, width=48, fps=8):
    """Frame t has brightness 10 * t, so decoded frames reveal which source frames were taken."""
    frames = np.stack([np.full((height, width, 3), 10 * t, dtype=np.uint8) for t in range(num_frames)])
    path.write_bytes(encode_mp4(frames, fps))


@pytest.fixture
def meta(tmp_path):
    (tmp_path / "clips").mkdir()
    numbered_video(tmp_path / "clips" / "a.mp4", 20)
    numbered_video(tmp_path / "clips" / "b.mp4", 12, fps=5)
    (tmp_path / "clips" / "broken.mp4").write_bytes(encode_mp4(np.zeros((8, 32, 48, 3), np.uint8), 8)[:300])
    csv = tmp_path / "meta.csv"
    csv.write_text("path,text,num_frames,height,width,fps\nclips/a.mp4,first,20,32,48,8\nclips/b.mp4,second,12,32,48,5\nclips/broken.mp4,third,8,32,48,8\n")
    return csv


def test_frames_are_taken_every_interval_from_a_seeded_start(meta):
    dataset = VariableVideoTextDataset(str(meta), frame_interval=3, num_frames=4, image_size=(16, 16), seed=1)
    sample = dataset[0]
    brightness = (sample["video"].mean(axis=(0, 2, 3)) + 1) * 127.5 / 10
    steps = np.diff(np.round(brightness))
    assert sample["video"].shape == (3, 4, 16, 16) and np.all(steps == 3)
    assert dataset[0]["video"].tobytes() == sample["video"].tobytes()  # deterministic per seed/epoch/index
    assert sample["fps"] == 8.0 and sample["text"] == "first" and sample["num_skipped"] == 0


def source_frames(sample):
    return np.round((sample["video"].mean(axis=(0, 2, 3)) + 1) * 127.5 / 10).astype(int).tolist()


def test_every_start_that_leaves_room_for_the_clip_occurs(meta):
    # 4 frames every 3 span 10 source frames, so a 20-frame video has starts 0..10 and no other
    dataset = VariableVideoTextDataset(str(meta), frame_interval=3, num_frames=4, image_size=(8, 8), seed=1)
    starts = set()
    for epoch in range(150):
        dataset.set_epoch(epoch)
        frames = source_frames(dataset[0])
        assert frames == list(range(frames[0], frames[0] + 10, 3))
        starts.add(frames[0])
    assert starts == set(range(11))


def test_a_clip_of_exactly_the_span_loads(tmp_path):
    numbered_video(tmp_path / "exact.mp4", 10)
    csv = tmp_path / "meta.csv"
    csv.write_text("path,text,num_frames,height,width,fps\nexact.mp4,exact,10,32,48,8\n")
    sample = VariableVideoTextDataset(str(csv), frame_interval=3, num_frames=4, image_size=(8, 8))[0]
    assert sample["num_skipped"] == 0 and source_frames(sample) == [0, 3, 6, 9]
    # one frame fewer is too short for this clip: it is skipped (and nothing else is readable)
    csv.write_text("path,text,num_frames,height,width,fps\nexact.mp4,exact,9,32,48,8\n")
    with pytest.raises(UserError, match="no readable clip"):
        VariableVideoTextDataset(str(csv), frame_interval=3, num_frames=4, image_size=(8, 8))[0]


def test_resize_crop_covers_the_target_and_keeps_the_range(meta):
    dataset = VariableVideoTextDataset(str(meta), num_frames=2, image_size=(40, 20))
    video = dataset[(1, 3, 24, 24)]["video"]  # a bucket index overrides the fixed size
    assert video.shape == (3, 3, 24, 24) and video.min() >= -1 and video.max() <= 1
    assert dataset[0]["video"].shape == (3, 2, 40, 20)


def test_unreadable_video_is_replaced_logged_and_counted(meta, caplog):
    dataset = VariableVideoTextDataset(str(meta), num_frames=4, image_size=(16, 16))
    sample = dataset[2]
    assert sample["num_skipped"] == 1 and sample["text"] == "first"
    dataset[2]
    assert sum("broken.mp4" in record.getMessage() for record in caplog.records) == 1
    batch = collate_batch([dataset[0], dataset[2]])
    assert batch["video"].shape == (2, 3, 4, 16, 16) and batch["num_skipped"].tolist() == [0, 1]


def test_csv_errors_name_row_and_column(tmp_path, meta):
    bad = tmp_path / "bad.csv"
    bad.write_text("path,text,num_frames,height\nclips/a.mp4,x,20,32\n")
    with pytest.raises(UserError, match=r"missing columns \['width'\]"):
        read_meta_csv(str(bad))
    bad.write_text("path,text,num_frames,height,width\nclips/a.mp4,x,twenty,32,48\n")
    with pytest.raises(UserError, match="line 2: column num_frames is 'twenty'"):
        read_meta_csv(str(bad))
    bad.write_text("path,text,num_frames,height,width\nclips/none.mp4,x,20,32,48\n")
    with pytest.raises(UserError, match="line 2: file clips/none.mp4 not found"):
        read_meta_csv(str(bad))
    rows = read_meta_csv(f"{meta},{meta}")
    assert len(rows) == 6 and rows[0]["aspect_ratio"] == pytest.approx(32 / 48)


def test_fixed_size_sampler_is_disjoint_and_covers_each_item_once():
    class Data:
        def __len__(self):
            return 23

    samplers = [FixedSizeBatchSampler(Data(), batch_size=3, num_replicas=2, rank=r, seed=0) for r in range(2)]
    batches = [list(s) for s in samplers]
    flat = [i for rank in batches for batch in rank for i in batch]
    assert len(batches[0]) == len(batches[1]) == len(samplers[0]) == 3 and len(set(flat)) == len(flat) == 18
    samplers[0].set_epoch(1)
    assert list(samplers[0]) != batches[0]


def test_sample_metadata_images_and_fixed_start(tmp_path, meta, caplog):
    from PIL import Image

    pixels = np.zeros((8, 16, 3), np.uint8)
    pixels[:, 8:] = 255
    Image.fromarray(pixels).save(tmp_path / "clips" / "still.png")
    csv = tmp_path / "images.csv"
    csv.write_text("path,text,num_frames,height,width\nclips/still.png,still,1,8,16\nclips/a.mp4,video,20,32,48\n")
    dataset = VariableVideoTextDataset(str(csv), num_frames=4, frame_interval=2, image_size=(8, 16), random_start=False)
    image = dataset[0]
    assert image["video"].shape == (3, 1, 8, 16) and image["fps"] == 120.0  # images get the original's image fps
    np.testing.assert_array_equal(image["video"][:, 0, :, :8], -1.0)
    np.testing.assert_array_equal(image["video"][:, 0, :, 8:], 1.0)
    video = dataset[1]
    assert (video["num_frames"], video["height"], video["width"], video["ar"]) == (4.0, 8.0, 16.0, 0.5)
    assert source_frames(video) == [0, 2, 4, 6]  # without random starts every clip starts at frame 0
    assert video["fps"] == 24.0  # no fps column: the original's default
    short = VariableVideoTextDataset(str(meta), num_frames=5, frame_interval=3, image_size=(8, 8))
    assert short[1]["text"] == "first"  # b.mp4 has 12 frames, fewer than 13: skipped and said why
    assert any("fewer than the 13 needed" in record.getMessage() for record in caplog.records)
