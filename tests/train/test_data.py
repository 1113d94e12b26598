"""The recipe's batch streams: image batches travel as uint8 and become the model's float32 on the device
(``to_model``, the same bits as the host arithmetic they replace); the prefetcher makes at most ``depth``
batches ahead."""
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastpt.data import images as image_data
from fastpt.data.images import preprocess_images
from fastpt.train.data import ImageStream, Prefetcher, pixels_to_float, to_model


def _host_floats(u8: torch.Tensor) -> torch.Tensor:
    """What ImageStream yielded before it kept uint8: the stacked images' float32 ``/ 127.5 - 1`` on the host."""
    return u8.float().div_(127.5).sub_(1.0)


@pytest.fixture
def folder(tmp_path):
    """7 grey 16x16 PGM images that together hold every uint8 value."""
    rng = np.random.default_rng(0)
    root = tmp_path / "folder"
    root.mkdir()
    for i in range(7):
        img = rng.permutation(256).astype(np.uint8).reshape(16, 16) if i else np.arange(256, dtype=np.uint8)
        (root / f"img{i}.pgm").write_bytes(b"P5\n16 16\n255\n" + img.tobytes())
    return root


@pytest.fixture
def array_dir(folder, tmp_path):
    preprocess_images(folder, tmp_path / "arrays", progress=False, log=None)
    return tmp_path / "arrays"


@pytest.mark.parametrize("kind", ["folder", "arrays"])
def test_image_batches_are_uint8_and_to_model_gives_the_host_floats(kind, folder, array_dir):
    """A batch is uint8 (a quarter of the bytes to collate, pin and copy); ``to_model`` of it is bit for bit
    the float32 batch the stream made on the host before, in the same order (across epoch ends)."""
    stream = ImageStream(str(folder if kind == "folder" else array_dir), seed=3, rank=1, world_size=2)
    it = stream.batches(5)
    for step in range(4):  # 20 samples of this rank, 40 positions: 5+ epochs of 7 images
        batch = next(it)
        assert batch["pixel_values"].dtype == torch.uint8 and batch["pixel_values"].shape == (5, 1, 16, 16)
        ref = torch.stack([stream.dataset[stream._index(step * 5 + b)][0] for b in range(5)])
        assert torch.equal(to_model(batch)["pixel_values"], _host_floats(ref))
    assert stream.state_dict()["consumed"] == 20


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("world_size", [1, 3])
def test_batch_indices_are_the_per_sample_indices(shuffle, world_size, array_dir):
    """``_indices`` (a batch's images at once) is ``_index`` of each sample, batches longer than an epoch
    and crossing epoch ends included."""
    for rank in range(world_size):
        stream = ImageStream(str(array_dir), seed=5, rank=rank, world_size=world_size, shuffle=shuffle)
        for k, count in ((0, 1), (0, 7), (2, 6), (5, 17), (30, 3)):
            want = [stream._index(k + i) for i in range(count)]
            assert stream._indices(k, count).tolist() == want, (rank, k, count)


def test_array_batches_are_gathered_in_one_step(array_dir, monkeypatch):
    """An array dataset's batch is one numpy gather, not an image-by-image read and stack."""
    stream = ImageStream(str(array_dir), seed=0)
    calls = []
    monkeypatch.setattr(image_data.ArrayImageDataset, "__getitem__", lambda self, i: calls.append(i))
    batch = next(stream.batches(6))
    assert calls == [] and batch["pixel_values"].shape == (6, 1, 16, 16)


def test_resized_array_batches_are_the_host_floats(array_dir):
    """Array datasets resized to data.image_size come as float32 (bilinear on the host, as before), which
    ``to_model`` leaves as they are."""
    stream = ImageStream(str(array_dir), image_size=12, seed=1)
    batch = next(stream.batches(4))
    ref = torch.stack([stream.dataset[stream._index(b)][0] for b in range(4)])
    ref = F.interpolate(_host_floats(ref), size=(12, 12), mode="bilinear", align_corners=False)
    assert batch["pixel_values"].dtype == torch.float32 and torch.equal(batch["pixel_values"], ref)
    assert to_model(batch)["pixel_values"] is batch["pixel_values"]


def test_to_model_converts_only_uint8_pixels():
    text = {"input_ids": torch.arange(6, dtype=torch.uint8).reshape(2, 3)}  # uint8, but no pixels
    assert to_model(text) is text
    u8 = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    batch = {"pixel_values": u8, "extra": 1}
    out = to_model(batch)
    assert out["extra"] == 1 and batch["pixel_values"] is u8  # the input batch is left as it was
    assert out["pixel_values"].dtype == torch.float32
    assert out["pixel_values"].min() == -1.0 and out["pixel_values"].max() == 1.0
    with pytest.raises(TypeError, match="x: expected uint8"):
        pixels_to_float(u8.float())


def test_pixel_table_is_the_cpu_arithmetic():
    """The lookup a GPU uses gives the CPU's division bit for bit, every value, any shape (int32 indices:
    a uint8 index would select as a mask)."""
    u8 = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 2, 9, 11), dtype=np.uint8))
    assert torch.equal(pixels_to_float(u8, table=True), _host_floats(u8))
    every = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(pixels_to_float(every, table=True), _host_floats(every))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_to_model_on_gpu_is_the_host_floats():
    """On the GPU, after the copy, the values are the host's bit for bit (its own ``x / 127.5`` is not)."""
    every = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    out = to_model({"pixel_values": every.cuda()})["pixel_values"]
    assert out.is_cuda and torch.equal(out.cpu(), _host_floats(every))


class _Counting:
    """A stream that counts the batches made."""

    def __init__(self):
        self.made = 0

    def batches(self, size):
        while True:
            self.made += 1
            yield {"x": torch.full((size,), self.made)}

    def state_dict(self):
        return {"made": self.made}


def _settled(stream, at_least, wait=0.3):
    """``stream.made`` once it has reached ``at_least`` and stayed put for ``wait`` seconds."""
    deadline = time.monotonic() + 5
    while stream.made < at_least and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(wait)
    return stream.made


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_prefetcher_makes_depth_batches_ahead(depth):
    """``depth`` batches ahead, made or being made, not ``depth + 1`` (the thread made one more while it
    waited on a full queue: at 224 px one more pinned batch of host memory)."""
    stream = _Counting()
    p = Prefetcher(stream, 2, depth)
    assert _settled(stream, depth) == depth
    assert next(p)["x"].tolist() == [1, 1] and p.state_dict() == {"made": 1}
    assert _settled(stream, depth + 1) == depth + 1  # one handed out, depth ahead again
    assert [next(p)["x"][0].item() for _ in range(3)] == [2, 3, 4]
    p.close()
    assert not p._thread.is_alive()
