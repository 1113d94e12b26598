"""The recipe's batch streams: text shards (``fastpt.data.shards.ShardDataset``) and images.

Both give the same small interface: ``batches(batch_size)`` (an endless iterator of collated
CPU batches, advancing the position), ``state_dict()`` / ``load_state_dict()`` (the position and
what it is valid for) and ``special_ids`` / ``vocab_size`` (text) or ``image_shape`` (images).
``to_model(batch)`` makes either's batch what the model takes, called after the batch is moved to the
device: images travel as uint8 and become float there.
Order and rank split follow ``ShardDataset``: epoch ``e`` is a ``default_rng([seed, e])``
permutation; rank ``r`` of ``W`` takes positions ``r, r + W, ...`` of the stream of epochs (its k-th
sample is global position ``k * W + r``, no padding at an epoch's end), so at every step, in every
epoch, the ranks together see the samples one process would see with the combined batch.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import queue
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .. import _dispatch
from ..data import images as image_data
from ..data.shards import ShardDataset, sha256_file


class TextStream:
    """``ShardDataset`` batches. Pack mode: ``input_ids`` (B, S) + ``cu_seqlens`` over the B*S tokens,
    ``max_seqlen``, ``position_ids``; doc mode: ``input_ids`` + ``attention_mask`` (B, S)."""

    def __init__(self, path, seq_len: int, *, mode: str = "pack", seed: int = 0, rank: int = 0, world_size: int = 1,
                 add_special="auto", shuffle: bool = True, verify: bool = True):
        self.dataset = ShardDataset(path, seq_len, mode=mode, seed=seed, rank=rank, world_size=world_size,
                                    add_special=add_special, shuffle=shuffle, verify=verify)
        self.seq_len, self.mode = seq_len, mode
        self.special_ids = dict(self.dataset.special_ids)
        self.vocab_size = int(self.dataset.manifest["vocab_size"])
        self.tokenizer_sha256 = (self.dataset.manifest.get("tokenizer") or {}).get("sha256")

    def batches(self, batch_size: int) -> Iterator[dict]:
        return self.dataset.batches(batch_size)

    def state_dict(self) -> dict:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)


def open_images(source: str, *, image_size: int | None = None):
    """"fashion-mnist", a directory written by ``fastpt preprocess --images`` or an image folder
    (``open_image_folder``: read at ``image_size`` when given)."""
    if source == "fashion-mnist":
        return image_data.fashion_mnist("train")
    p = Path(source)
    if (p / "manifest.json").is_file():
        return image_data.open_image_dataset(p)
    if p.is_dir():
        return open_image_folder(p, image_size=image_size)
    raise FileNotFoundError(f"data.images: {source} is neither 'fashion-mnist' nor a directory")


def open_image_folder(root, *, image_size: int | None = None) -> image_data.ImageFolder:
    """An image folder for training, every image decoded once here: what would otherwise stop a run
    mid-way (a file that cannot be read, sizes that cannot be stacked into one batch) is a ValueError
    naming the file and the recipe key before the first step, and the folder's samples (the sorted
    file list, so the order and resume position) stay fixed for the run.

    Images take the first image's channels (as ``fastpt preprocess --images``); with
    ``image_size`` they are resized to it on load (bicubic, as ``preprocess --image-size`` and
    ``fastpt eval vision``), without it they must share one size. An unreadable image is an
    error, as in ``fastpt eval vision``: skipping it would train on other samples than the folder
    lists, unreported (``fastpt preprocess --images`` skips and counts them in its manifest). The
    check costs one decoding pass over the folder; for large folders preprocess once and train
    on its memory-mapped output.
    """
    folder = image_data.ImageFolder(root, size=image_size)
    bad, sizes = [], {}  # (file, error); (h, w) -> first file of that size
    for path in folder.files:
        try:
            img = image_data.load_image(path, channels=folder.channels, size=image_size)
        except ImportError as exc:  # Pillow missing: a setup problem, not the data's
            raise ValueError(f"data.images: {exc}") from exc
        except (OSError, ValueError, SyntaxError) as exc:  # what Pillow / the PGM reader raise for a bad file
            bad.append((path, exc))
            continue
        if folder.channels is None:
            folder.channels = img.shape[0]  # the rest converted to the first image's channels
        sizes.setdefault(tuple(img.shape[1:]), path)
    if bad:
        shown = "; ".join(f"{f}: {exc}" for f, exc in bad[:3]) + (" ..." if len(bad) > 3 else "")
        raise ValueError(f"data.images: {len(bad)} of {len(folder.files)} images in {root} cannot be read ({shown}); "
                         "remove them, or train on the output of `fastpt preprocess --images`, which skips and "
                         "counts unreadable images")
    if len(sizes) > 1:
        shown = ", ".join(f"{h}x{w} ({f})" for (h, w), f in list(sizes.items())[:3])
        h = next(iter(sizes))[0]
        raise ValueError(f"data.images: the images in {root} differ in size: {shown}{' ...' if len(sizes) > 3 else ''};"
                         f" set data.image_size to resize them on load, e.g. --set data.image_size={h}")
    return folder


class ImageStream:
    """Batches ``{"pixel_values": uint8 (B, C, H, W)}`` of an image dataset (``open_images``), resized to
    ``image_size`` when given (folder images on load, since they may differ in size; array datasets by
    batch, which then come as the model's float32 already). ``to_model`` makes the model's float32 in
    [-1, 1] (``x / 127.5 - 1``) of a batch, on the device it was moved to: a uint8 batch is a quarter of
    the float32 one to collate, pin and copy to the GPU. Position: samples consumed by this rank
    (as ``ShardDataset``)."""

    def __init__(self, source: str, *, image_size: int | None = None, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True):
        self.dataset = open_images(source, image_size=image_size)
        self.n = len(self.dataset)
        if self.n == 0:
            raise ValueError(f"data.images: {source} holds no image")
        self.source, self.image_size = str(source), image_size
        self.fingerprint = _image_fingerprint(source, self.dataset)
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.consumed = 0
        self._perm_epoch, self._perm = -1, None
        c, h, w = self.dataset[0][0].shape
        self.image_shape = (c, image_size or h, image_size or w)

    def __len__(self) -> int:
        """Samples per epoch on this rank, at most: ceil(samples / world_size)."""
        return -(-self.n // self.world_size)

    def _permutation(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s order of the images, ``default_rng([seed, epoch])`` (the last one kept)."""
        if epoch != self._perm_epoch:
            self._perm, self._perm_epoch = np.random.default_rng([self.seed, epoch]).permutation(self.n), epoch
        return self._perm

    def _index(self, k: int) -> int:
        """The image of this rank's k-th sample: global position ``k * world_size + rank`` of the stream of
        epochs (as ``ShardDataset.sample_index``)."""
        epoch, pos = divmod(k * self.world_size + self.rank, self.n)
        return pos if not self.shuffle else int(self._permutation(epoch)[pos])

    def _indices(self, k: int, count: int) -> np.ndarray:
        """``_index`` of this rank's samples ``k .. k + count - 1``, int64 (count,), computed at once (a batch
        may span several epochs: more samples than images)."""
        epoch, pos = np.divmod((k + np.arange(count, dtype=np.int64)) * self.world_size + self.rank, self.n)
        if not self.shuffle:
            return pos
        out = np.empty_like(pos)
        for e in np.unique(epoch):
            at = epoch == e
            out[at] = self._permutation(int(e))[pos[at]]
        return out

    def batches(self, batch_size: int) -> Iterator[dict]:
        """Endless batches ``{"pixel_values": (batch_size, C, H, W)}``, uint8 (float32 where an array
        dataset is resized); ``to_model`` makes them the model's inputs."""
        while True:
            x = self.dataset.get_images(self._indices(self.consumed, batch_size))
            self.consumed += batch_size
            if self.image_size and tuple(x.shape[-2:]) != (self.image_size, self.image_size):
                # bilinear on the host: the same values on every device (a GPU's interpolation may round
                # otherwise), a cost only datasets stored at another size pay
                x = F.interpolate(pixels_to_float(x), size=(self.image_size, self.image_size), mode="bilinear",
                                  align_corners=False)
            yield {"pixel_values": x}  # no labels: pre-training is self-supervised

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "seed": self.seed, "world_size": self.world_size, "shuffle": self.shuffle,
                "source": self.source, "samples": self.n, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """The position of ``state``, which must be of these images (their fingerprint: the same content
        under another path resumes, a folder regenerated under the same name does not) with the same
        seed, rank count and shuffle. A state without a fingerprint (an older fastpt) compares the
        resolved source path."""
        mine = self.state_dict()
        keys = ["seed", "world_size", "shuffle", "samples"]
        if "fingerprint" in state:
            keys.append("fingerprint")
        elif _resolved(state.get("source")) != _resolved(self.source):
            raise ValueError(f"load_state_dict: saved source={state.get('source')!r}, this dataset has "
                             f"{self.source!r}")
        for key in keys:
            if json.dumps(state.get(key)) != json.dumps(mine[key]):
                what = " (the images' content changed)" if key == "fingerprint" else ""
                raise ValueError(f"load_state_dict: saved {key}={state.get(key)!r}, this dataset has "
                                 f"{mine[key]!r}{what}")
        self.consumed = int(state["consumed"])


def to_model(batch: dict) -> dict:
    """A collated batch as the model takes it: uint8 ``pixel_values`` (``ImageStream``) become float32
    in [-1, 1] (``pixels_to_float``) on the device they are on; every other key, and float pixels, as they
    are. Call it after moving the batch to the device (the recipe's ``to_device``), so the host collates,
    pins and copies a quarter of the bytes and the device does the arithmetic."""
    px = batch.get("pixel_values")
    if not (isinstance(px, torch.Tensor) and px.dtype == torch.uint8):
        return batch
    return {**batch, "pixel_values": pixels_to_float(px)}


@functools.lru_cache(maxsize=1)
def _pixel_values() -> tuple[float, ...]:
    """``pixels_to_float`` of the 256 uint8 values, computed by the CPU arithmetic (float32 values as Python
    floats: the table ``device_constant`` makes once per device holds the same bits)."""
    return tuple(pixels_to_float(torch.arange(256, dtype=torch.uint8), table=False).tolist())


def pixels_to_float(x: torch.Tensor, *, table: bool | None = None) -> torch.Tensor:
    """uint8 pixels (any shape) -> float32 ``x / 127.5 - 1`` in [-1, 1], on ``x``'s device, the same bits
    on every device: on the CPU the arithmetic itself (``x.float().div_(127.5).sub_(1.0)``, what the image
    stream computed on the host before it yielded uint8); elsewhere (or with ``table=True``) a lookup in a
    table of those 256 CPU values. (A GPU's division by a scalar is a multiplication by its reciprocal, which
    rounds 111 of the 256 values one ulp apart from the CPU's division: PyTorch's ``div_true_kernel_cuda``.)
    Raises TypeError naming ``x`` for pixels of another dtype."""
    if x.dtype != torch.uint8:
        raise TypeError(f"x: expected uint8 pixels, got {x.dtype}")
    if not (x.device.type != "cpu" if table is None else table):
        return x.float().div_(127.5).sub_(1.0)
    lut = _dispatch.device_constant(_pixel_values(), torch.float32, x.device)
    return lut[x.int()]  # int32 indices: uint8 ones would be a boolean mask


def _resolved(source) -> str:
    return source if source in (None, "fashion-mnist") else os.path.realpath(str(source))


def _image_fingerprint(source: str, dataset) -> str:
    """What the images are, not where: Fashion-MNIST's train split by name, a ``fastpt preprocess --images``
    output by its files' sha256 (from its manifest, verified on open), an image folder by the sha256 of
    each file's path within it and bytes."""
    if source == "fashion-mnist":
        return "fashion-mnist:train"
    root = Path(source)
    h = hashlib.sha256()
    if (root / "manifest.json").is_file():
        files = json.loads((root / "manifest.json").read_text()).get("files", {})
        for k in sorted(files):
            h.update(f"{k}:{files[k].get('sha256')}\n".encode())
        return h.hexdigest()
    for f in dataset.files:
        h.update(f"{Path(f).relative_to(root).as_posix()}:{sha256_file(f)}\n".encode())
    return h.hexdigest()


class Prefetcher:
    """The batches of a stream (``TextStream`` / ``ImageStream``) made ``depth`` ahead on a background thread,
    optionally in pinned memory, so that reading and collating the next batch overlaps the step on the GPU
    (and ``.to(device, non_blocking=True)`` of a pinned batch is an asynchronous copy).

    At most ``depth`` batches exist beyond those handed out, made or being made: the thread takes one of
    ``depth`` slots before it makes a batch and ``__next__`` gives the slot back when it hands that batch out.
    (A queue of ``depth`` alone let the thread make one more while it waited to put it: ``depth + 1`` batches
    of host memory, each pinned.)

    ``state_dict()`` is the position after the batches handed out so far, not after those made ahead (the
    thread records the stream's position after each batch it makes): a checkpoint resumes at the first
    batch not trained on, exactly as without prefetching. The streams draw no global random numbers, so
    making batches on another thread changes nothing else. ``close()`` stops the thread.
    """

    def __init__(self, stream, batch_size: int, depth: int, *, pin: bool = False):
        if depth < 1:
            raise ValueError(f"depth: expected >= 1, got {depth}")
        self.stream, self.pin = stream, pin
        self._state = copy.deepcopy(stream.state_dict())
        self._queue: queue.Queue = queue.Queue()  # bounded by the slots
        self._slots = threading.Semaphore(depth)
        self._stop = threading.Event()
        self._final: BaseException | None = None  # what ended the thread, once handed out
        self._batches = stream.batches(batch_size)
        self._thread = threading.Thread(target=self._run, name="fastpt-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while self._take_slot():
                batch = next(self._batches)
                if self.pin:
                    batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                self._queue.put((batch, copy.deepcopy(self.stream.state_dict())))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            self._queue.put((exc, None))

    def _take_slot(self) -> bool:
        """Wait for a free slot; False once ``close()`` stops the thread."""
        while not self._stop.is_set():
            if self._slots.acquire(timeout=0.1):
                return True
        return False

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._final is not None:  # the thread has ended: the same end again, not a wait on an empty queue
            raise self._final
        batch, state = self._queue.get()
        if state is None:
            self._final = StopIteration() if isinstance(batch, StopIteration) else batch
            raise batch
        self._state = state
        self._slots.release()  # handed out: the thread may make the next one
        return batch

    def state_dict(self) -> dict:
        return self._state

    def close(self) -> None:
        self._stop.set()
        while True:  # free the batches made ahead
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=10)
