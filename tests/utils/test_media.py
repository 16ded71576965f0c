"""Images and videos on disk (utils/media.py): probing, reading (all frames or some), resizing and cropping,
one-line errors for unreadable files, and writing videos atomically, reproducibly and without clobbering."""

import io
import os

import av
import numpy as np
import pytest
from PIL import Image

from utils.errors import UserError
from utils.media import (
    IMAGE_FPS,
    MediaInfo,
    encode_mp4,
    probe,
    probe_or_explain,
    read_frames,
    read_video_frames,
    resize_crop,
    save_video,
    write_mp4,
)


@pytest.fixture
def media(tmp_path):
    """A white 30x60 image and a 6-frame 32x48 video, 8 fps, brighter in every frame."""
    image = tmp_path / "ref.png"
    Image.fromarray(np.full((30, 60, 3), 255, dtype=np.uint8)).save(image)
    frames = np.stack([np.full((32, 48, 3), 20 * t, dtype=np.uint8) for t in range(6)])
    video = tmp_path / "ref.mp4"
    video.write_bytes(encode_mp4(frames, 8))
    return str(image), str(video)


def decoded(source):
    """Frames [T, H, W, 3] and frame rate of a video path or file."""
    with av.open(source) as container:
        stream = container.streams.video[0]
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]), float(stream.average_rate)


def test_probe_images_and_videos(media):
    image, video = media
    assert probe(image) == MediaInfo(num_frames=1, height=30, width=60, fps=float(IMAGE_FPS)) and IMAGE_FPS == 120
    assert probe(video) == MediaInfo(num_frames=6, height=32, width=48, fps=8.0)
    assert probe_or_explain(video) == probe(video)


def test_read_frames_in_order(media):
    image, video = media
    images = read_frames(image)
    assert len(images) == 1 and images[0].mode == "RGB" and images[0].size == (60, 30)
    frames = read_frames(video)
    assert len(frames) == 6 and frames[0].size == (48, 32)
    brightness = [np.asarray(frame).mean() for frame in frames]
    np.testing.assert_allclose(brightness, [20 * t for t in range(6)], atol=3)


@pytest.mark.parametrize("indices", [[0], [1, 3, 5], [5], [0, 1, 2, 3, 4, 5], [2, 3]])
def test_read_video_frames_gives_the_frames_asked_for(media, indices):
    _, video = media
    every = [np.asarray(frame) for frame in read_frames(video)]
    some = read_video_frames(video, indices)
    assert len(some) == len(indices)
    for index, frame in zip(indices, some):
        np.testing.assert_array_equal(np.asarray(frame), every[index])


def test_read_video_frames_past_the_end(media):
    _, video = media
    with pytest.raises(ValueError, match=r"frames \[6, 7\] could not be decoded"):
        read_video_frames(video, [4, 6, 7])


def halves(height, width):
    """Left half red, right half blue."""
    image = np.zeros((height, width, 3), np.uint8)
    image[:, : width // 2] = (255, 0, 0)
    image[:, width // 2 :] = (0, 0, 255)
    return Image.fromarray(image)


def test_resize_crop_covers_the_target_then_crops_the_centre():
    out = resize_crop(halves(30, 60), 16, 16)  # scaled to 32x16, columns 8..23 kept
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert (out[:, :7] == (255, 0, 0)).all() and (out[:, 9:] == (0, 0, 255)).all()
    out = resize_crop(halves(60, 30), 16, 32)  # scaled to 32x64, rows 8..23 and every column kept
    assert out.shape == (16, 32, 3)
    assert (out[:, :15] == (255, 0, 0)).all() and (out[:, 17:] == (0, 0, 255)).all()
    np.testing.assert_array_equal(resize_crop(halves(16, 16), 16, 16), np.asarray(halves(16, 16)))  # same size: untouched


def test_center_crops_at_native_resolution_and_only_scales_up():
    out = resize_crop(halves(30, 60), 16, 16, transform_name="center")  # columns 22..37 of 60
    assert out.shape == (16, 16, 3)
    assert (out[:, :8] == (255, 0, 0)).all() and (out[:, 8:] == (0, 0, 255)).all()
    small = resize_crop(halves(8, 8), 16, 16, transform_name="center")  # too small: doubled
    assert small.shape == (16, 16, 3)
    assert (small[:, :7] == (255, 0, 0)).all() and (small[:, 9:] == (0, 0, 255)).all()


def jpeg_bytes():
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def write(path, content):
    path.write_bytes(content)
    return str(path)


def audio_only(path):
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


@pytest.mark.parametrize("make,message", [
    (lambda d: str(d / "missing.png"), r"^reference \S+missing\.png: file not found$"),
    (lambda d: str(d), "is a directory; give an image or video file"),
    (lambda d: write(d / "empty.mp4", b""), "empty.mp4: the file is empty"),
    (lambda d: write(d / "text.png", b"not an image"), "text.png: not a readable image"),
    (lambda d: write(d / "cut.jpg", jpeg_bytes()[:300]), "cut.jpg: not a readable image"),
    (lambda d: write(d / "cut.mp4", encode_mp4(np.zeros((4, 16, 16, 3), np.uint8), 8)[:100]), "cut.mp4: not a readable image or video"),
    (lambda d: audio_only(d / "sound.mp4"), "sound.mp4: not a readable image or video .*has no video stream"),
])
def test_unreadable_files_are_one_line_errors(tmp_path, make, message):
    with pytest.raises(UserError, match=message) as error:
        probe_or_explain(make(tmp_path))
    assert "\n" not in str(error.value)


def test_errors_say_what_the_file_was_for(tmp_path):
    with pytest.raises(UserError, match=r"^video \S+none\.mp4: file not found$"):
        probe_or_explain(str(tmp_path / "none.mp4"), what="video")


def smooth_video(num_frames, height, width):
    """uint8 [T, H, W, 3]: colour gradients that H.264 (yuv420p, crf 18) keeps within a few levels on average."""
    y, x = np.mgrid[0:height, 0:width]
    frames = [np.stack([x * 200 // width, y * 200 // height, np.full_like(x, 30 * t)], axis=-1) for t in range(num_frames)]
    return np.stack(frames).astype(np.uint8)


def test_save_video_round_trip_determinism_and_no_clobber(tmp_path):
    video = smooth_video(5, 24, 30)
    first = save_video(video, fps=8, save_path=str(tmp_path / "s"))
    second = save_video(video, fps=8, save_path=str(tmp_path / "s"))
    assert first == str(tmp_path / "s.mp4") and second == str(tmp_path / "s_1.mp4")
    assert (tmp_path / "s.mp4").read_bytes() == (tmp_path / "s_1.mp4").read_bytes()
    with av.open(first) as container:  # and no wall-clock time in the file, so also on another day
        assert container.metadata.get("creation_time", "1970-01-01T00:00:00Z").startswith("1970-01-01")
    frames, fps = decoded(first)
    assert frames.shape == (5, 24, 30, 3) and fps == 8.0
    assert np.abs(frames.astype(int) - video).mean() < 4
    again = save_video(video[::-1].copy(), fps=8, save_path=str(tmp_path / "s"), overwrite=True)
    assert again == first and not os.path.exists(str(tmp_path / "s_2.mp4"))
    assert np.abs(decoded(first)[0].astype(int) - video[::-1]).mean() < 4  # replaced
    png = save_video(video[:1], fps=8, save_path=str(tmp_path / "one"))
    assert png == str(tmp_path / "one.png")
    np.testing.assert_array_equal(np.asarray(Image.open(png)), video[0])  # lossless
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
    assert sorted(os.listdir(tmp_path)) == ["one.png", "s.mp4", "s_1.mp4"]


def test_save_video_creates_the_directory(tmp_path):
    path = save_video(smooth_video(2, 8, 8), fps=4, save_path=str(tmp_path / "a" / "b" / "clip"))
    assert path == str(tmp_path / "a" / "b" / "clip.mp4") and decoded(path)[0].shape == (2, 8, 8, 3)


def test_write_mp4_pads_odd_sizes_by_repeating_the_edge(tmp_path):
    video = smooth_video(3, 23, 31)
    write_mp4(video, 6, str(tmp_path / "odd.mp4"))
    frames, fps = decoded(str(tmp_path / "odd.mp4"))
    assert frames.shape == (3, 24, 32, 3) and fps == 6.0
    assert np.abs(frames[:, :23, :31].astype(int) - video).mean() < 4
    assert np.abs(frames[:, 23, :31].astype(int) - video[:, 22]).mean() < 5
    assert np.abs(frames[:, :23, 31].astype(int) - video[:, :, 30]).mean() < 5


def test_encode_mp4_gives_the_bytes_write_mp4_writes_to_a_path_or_a_file(tmp_path):
    video = smooth_video(4, 16, 24)
    write_mp4(video, 8, str(tmp_path / "path.mp4"))
    with open(tmp_path / "file.mp4", "wb") as f:
        write_mp4(video, 8, f)
    data = encode_mp4(video, 8)
    assert data == (tmp_path / "path.mp4").read_bytes() == (tmp_path / "file.mp4").read_bytes()
    frames, fps = decoded(io.BytesIO(data))
    assert frames.shape == (4, 16, 24, 3) and fps == 8.0


def test_crf_trades_size_for_quality():
    video = smooth_video(4, 32, 48)
    fine, coarse = encode_mp4(video, 8), encode_mp4(video, 8, crf=45)
    assert len(coarse) < len(fine)
    errors = [np.abs(decoded(io.BytesIO(data))[0].astype(int) - video).mean() for data in (fine, coarse)]
    assert errors[0] < errors[1]


def test_save_video_writes_a_hidden_temporary_beside_the_target_and_removes_it_on_failure(tmp_path, monkeypatch):
    import utils.media

    seen = []

    def failing_write(frames, fps, target, crf=18):
        seen.append(target)
        with open(target, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(utils.media, "write_mp4", failing_write)
    frames = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(OSError, match="disk full"):
        utils.media.save_video(frames, 8, str(tmp_path / "out" / "clip"))
    directory, name = os.path.split(seen[0])
    assert directory == str(tmp_path / "out") and name.startswith(".sample.") and name.endswith(".mp4.tmp")
    assert os.listdir(tmp_path / "out") == []  # neither the temporary nor a partial clip.mp4


def test_read_video_frames_seeks_to_frames_past_several_keyframes(tmp_path):
    """Frame t of the clip is filled with grey 6 t; keyframes every 5 frames make the reader seek, and frames
    counted from the seek point instead of by timestamp would come back with the wrong greys."""
    from utils.media import read_video_frames

    path = str(tmp_path / "keyframes.mp4")
    with av.open(path, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.height = stream.width = 16
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = 5
        stream.options = {"crf": "0", "keyint_min": "5", "sc_threshold": "0"}
        for t in range(40):
            frame = av.VideoFrame.from_ndarray(np.full((16, 16, 3), 6 * t, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    wanted = [22, 25, 31, 39]
    greys = [np.asarray(image).mean() for image in read_video_frames(path, wanted)]
    np.testing.assert_allclose(greys, [6 * t for t in wanted], atol=2)
    assert [np.asarray(image).mean() for image in read_video_frames(path, [0, 1])] == pytest.approx([0, 6], abs=2)
