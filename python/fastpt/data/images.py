"""Image datasets: a folder of images, the Debian fashion-mnist files, and the preprocessed
array format ``fastpt preprocess --images`` writes.

Every dataset yields ``(image, label)`` with ``image`` a uint8 tensor (C, H, W) and
``label`` an int (-1 for unlabelled images); ``get_images(indices)`` gives a batch of them, uint8
(B, C, H, W) (an array dataset gathers it in one numpy step). Folder images are read with Pillow
when it is installed; binary PGM/PPM (P5/P6, 8- or 16-bit) are read without it, scaled to 8 bit as Pillow
scales them (``_read_pnm``), so both paths give the same pixels. 16-bit greyscale (Pillow modes
``I;16`` / ``I``: 16-bit PNG, TIFF, PGM) is scaled to 8 bit, ``round(v * 255 / 65535)``, not
clipped at 255 as Pillow's ``convert("L")`` does. Fashion-MNIST comes from the
Debian package ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``), which
installs the gzipped IDX files under ``/usr/share/datasets/fashion-mnist``.

Preprocessed directory::

    images.npy      (N, C, H, W) uint8, ``numpy.load(path, mmap_mode="r")``
    labels.npy      (N,) int64
    manifest.json   {"format": "fastpt-images", "version": 1, "kind": "images", "complete": true,
                     "shape": [N, C, H, W], "classes": [...], "source": ...,
                     "files": {"images": {"file", "sha256", "bytes"}, "labels": {...}},
                     "stats": {"images": N, "bad": {"unreadable": k, "size_mismatch": k}}}
"""
from __future__ import annotations

import gzip
import os
import re
import struct
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .._lock import lock_preprocess_output, unlock_dir
from .shards import (MANIFEST, CorruptShardError, check_int, named_os_error, read_json_object, replacing,
                     sha256_file, unlink_quietly, verify_file, write_json_atomic)

FORMAT, VERSION = "fastpt-images", 1
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
PNM_SUFFIXES = (".pgm", ".ppm")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (MNIST format, ``.gz`` or raw) into an array of its stored shape.

    Raises ValueError for a bad magic number or a size that does not match the header.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    body = data[4 + 4 * ndim:]
    if len(body) != int(np.prod(shape)) * dtype.itemsize:
        raise ValueError(f"{path}: {len(body)} data bytes, the header says shape {shape} of {dtype}")
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def find_fashion_mnist(root: str | os.PathLike | None = None) -> Path:
    """The directory holding the fashion-mnist IDX files (``root``, $FASHION_MNIST, Debian's path).

    Raises FileNotFoundError saying how to install them.
    """
    candidates = [root] if root else [os.environ.get("FASHION_MNIST"), *FASHION_MNIST_DIRS]
    for c in filter(None, candidates):
        if (Path(c) / "train-images-idx3-ubyte.gz").is_file() or (Path(c) / "train-images-idx3-ubyte").is_file():
            return Path(c)
    raise FileNotFoundError(f"fashion-mnist IDX files not found in {[c for c in candidates if c]}: "
                            "install them with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu) "
                            "or set FASHION_MNIST to a directory holding train-images-idx3-ubyte.gz ...")


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``split`` ("train": 60000, "test": 10000): images (N, 1, 28, 28) uint8, labels (N,) int64."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    d, prefix = find_fashion_mnist(root), "train" if split == "train" else "t10k"

    def pick(name: str) -> Path:
        return d / f"{name}.gz" if (d / f"{name}.gz").is_file() else d / name

    images = read_idx(pick(f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(pick(f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{d}: {len(images)} images but {len(labels)} labels")
    return images[:, None], labels


# -- folders of images --------------------------------------------------------------------
def list_image_folder(root: str | os.PathLike) -> tuple[list[Path], list[int], list[str]]:
    """Image files under ``root`` (sorted), their labels and the class names.

    With class subfolders (``root/<class>/...``, recursive; folders holding no image are not classes)
    labels index the sorted class names; images directly in ``root`` with no class folder get label -1
    (unlabelled). Raises FileNotFoundError when there is no image, ValueError for images directly in
    ``root`` beside class folders (neither labelled nor a set of their own).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root}: not a directory")
    suffixes = PNM_SUFFIXES + PIL_SUFFIXES

    def images(d: Path) -> list[Path]:
        return sorted((f for f in d.rglob("*") if f.is_file() and f.suffix.lower() in suffixes
                       and not any(p.startswith(".") for p in f.relative_to(root).parts)),
                      key=lambda f: f.relative_to(root).as_posix())

    found = {d.name: images(d) for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")}
    classes = sorted(name for name, fs in found.items() if fs)  # folders without images are no class
    files, labels = [], []
    for label, name in enumerate(classes):
        files += found[name]
        labels += [label] * len(found[name])
    loose = [f for f in images(root) if f.parent == root]
    if classes and loose:
        raise ValueError(f"image folder {root}: {len(loose)} images directly in it (e.g. {loose[0].name}) beside "
                         f"the class folders {classes[:5]}{' ...' if len(classes) > 5 else ''}: move them into a "
                         f"class folder, or the class folders out for one unlabelled set")
    if not classes:
        files = loose
        labels = [-1] * len(files)
    if not files:
        raise FileNotFoundError(f"image folder {root}: no images ({', '.join(suffixes)})")
    return files, labels, classes


def _scale_16_to_8(values: np.ndarray) -> np.ndarray:
    """16-bit samples (0..65535) -> uint8, ``round(v * 255 / 65535)`` (never a tie: 65535 = 255 * 257)."""
    return np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8)


def _pnm_scale(values: np.ndarray, maxval: int, out_max: int) -> np.ndarray:
    """Pillow's PNM decoder: ``min(out_max, round(v / maxval * out_max))`` (round half to even, as Python's)."""
    return np.minimum(out_max, np.round(values.astype(np.float64) / maxval * out_max))


def _read_pnm(path: Path) -> np.ndarray:
    """A binary PGM (P5) / PPM (P6) as uint8 (C, H, W), without Pillow; the same pixels Pillow gives.

    Samples are scaled to 8 bit as Pillow's PNM decoder does: ``round(v / maxval * 255)`` (capped at
    255) for maxval other than 255 (fewer levels, e.g. 15, stretched to 0..255) and for 16-bit PPM
    (maxval 256..65535, two big-endian bytes a sample); 16-bit PGM goes as Pillow's mode ``I``,
    ``round(v / maxval * 65535)``, then to 8 bit as every 16-bit grey image (``_scale_16_to_8``).
    Raises ValueError naming the file for another format, a maxval outside 1..65535 or missing data.
    """
    data = path.read_bytes()
    fields, pos = [], 0
    while len(fields) < 4:  # magic, width, height, maxval separated by whitespace and comments
        while pos < len(data) and data[pos:pos + 1].isspace():
            pos += 1
        if data[pos:pos + 1] == b"#":
            pos = data.index(b"\n", pos)
            continue
        end = pos
        while end < len(data) and not data[end:end + 1].isspace():
            end += 1
        fields.append(data[pos:end])
        pos = end
    magic, w, h, maxval = fields[0], int(fields[1]), int(fields[2]), int(fields[3])
    if magic not in (b"P5", b"P6"):
        raise ValueError(f"{path}: only binary PGM (P5) / PPM (P6) are read without Pillow, got {magic!r}")
    if not 0 < maxval <= 65535:
        raise ValueError(f"{path}: PNM maxval must be in 1..65535, got {maxval}")
    c = 1 if magic == b"P5" else 3
    dtype = np.dtype(">u2" if maxval > 255 else np.uint8)
    count = w * h * c
    pixels = np.frombuffer(data[pos + 1:pos + 1 + count * dtype.itemsize], dtype=dtype)
    if pixels.size != count:
        raise ValueError(f"{path}: {pixels.size} samples, the header says {w} x {h} x {c} (truncated file)")
    if maxval > 255 and c == 1:
        pixels = _scale_16_to_8(pixels if maxval == 65535 else _pnm_scale(pixels, maxval, 65535))
    elif maxval != 255:
        pixels = _pnm_scale(pixels, maxval, 255).astype(np.uint8)
    return pixels.reshape(h, w, c).transpose(2, 0, 1).copy()


def check_image_args(channels: int | None, size: int | None, size_name: str = "size") -> None:
    """Raise TypeError / ValueError naming the argument unless ``channels`` is None, 1 or 3 and
    ``size`` is None or a positive int."""
    if channels is not None and (isinstance(channels, bool) or channels not in (1, 3)):
        raise ValueError(f"channels must be 1 (grey), 3 (RGB) or None (the images' own), got {channels!r}")
    if size is not None:
        check_int(size_name, size, 1)


def load_image(path: str | os.PathLike, *, channels: int | None = None, size: int | None = None) -> np.ndarray:
    """One image as uint8 (C, H, W); ``channels`` 1 (grey) or 3 (RGB) converts, ``size`` resizes
    to size x size (bicubic, Pillow). PGM/PPM load without Pillow. 16-bit grey images (Pillow modes
    ``I;16*``, and ``I`` with values in 0..65535) are scaled to 8 bit, ``round(v * 255 / 65535)``.

    Raises ImportError (Pillow needed and missing), ValueError / OSError (unreadable; a mode ``I``
    image with values outside 0..65535, naming the file), TypeError / ValueError naming
    ``channels`` / ``size`` for a value outside the above.
    """
    check_image_args(channels, size)
    path = Path(path)
    if path.suffix.lower() in PNM_SUFFIXES and size is None:
        img = _read_pnm(path)
        if channels is not None and channels != img.shape[0]:
            img = np.repeat(img, 3, 0) if channels == 3 else \
                np.round(img.astype(np.float64).transpose(1, 2, 0) @ [0.299, 0.587, 0.114]).astype(np.uint8)[None]
        return img
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError(f"{path}: reading {path.suffix or 'this'} images (or resizing) needs Pillow: "
                          "pip install pillow (PGM/PPM files load without it)") from exc
    with Image.open(path) as im:
        if im.mode == "I" or im.mode.startswith("I;16"):
            # Pillow's convert("L") clips these at 255 (a 16-bit image turns nearly binary): scale instead
            values = np.asarray(im)
            if im.mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
                raise ValueError(f"{path}: Pillow mode I (32-bit integer) pixels span {values.min()}..{values.max()}; "
                                 f"only 16-bit values (0..65535) are scaled to 8 bit")
            im = Image.fromarray(_scale_16_to_8(values))
        mode = {1: "L", 3: "RGB", None: "L" if im.mode in ("L", "1") else "RGB"}[channels]
        im = im.convert(mode)
        if size is not None:
            im = im.resize((size, size), Image.BICUBIC)
        arr = np.asarray(im, dtype=np.uint8)
    return arr[None].copy() if arr.ndim == 2 else arr.transpose(2, 0, 1).copy()


class ImageFolder(torch.utils.data.Dataset):
    """Images of a folder (see ``list_image_folder``), decoded on access: ``(uint8 (C, H, W), label)``.

    ``channels`` and ``size`` as in ``load_image``; attributes ``files``, ``labels``, ``classes``.
    """

    def __init__(self, root: str | os.PathLike, *, channels: int | None = None, size: int | None = None):
        check_image_args(channels, size)
        self.files, self.labels, self.classes = list_image_folder(root)
        self.channels, self.size = channels, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(load_image(self.files[i], channels=self.channels, size=self.size)), self.labels[i]

    def get_images(self, indices: Sequence[int]) -> torch.Tensor:
        """The images at ``indices``, uint8 (B, C, H, W), decoded one by one (they must share one size)."""
        return torch.stack([self[int(i)][0] for i in indices])


class ArrayImageDataset(torch.utils.data.Dataset):
    """Images from uint8 arrays (N, C, H, W) and labels (N,): ``(uint8 tensor (C, H, W), int label)``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: Sequence[str] = ()):
        if images.ndim != 4 or images.dtype != np.uint8 or len(images) != len(labels):
            raise ValueError(f"images must be uint8 (N, C, H, W) with N labels, got {images.dtype} "
                             f"{images.shape} and {len(labels)} labels")
        self.images, self.labels, self.classes = images, labels, list(classes)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(np.array(self.images[i])), int(self.labels[i])

    def get_images(self, indices: Sequence[int]) -> torch.Tensor:
        """The images at ``indices``, uint8 (B, C, H, W): one numpy gather (``images[indices]``, a copy
        also of a memory map), not B ``__getitem__`` reads and a stack (about 5x slower per image at
        224 px). Indices as numpy's (IndexError for one out of range)."""
        return torch.from_numpy(np.ascontiguousarray(self.images[np.asarray(indices, dtype=np.int64)]))


def fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> ArrayImageDataset:
    """Fashion-MNIST as a dataset of ``(uint8 (1, 28, 28), label 0..9)``; see ``load_fashion_mnist``."""
    return ArrayImageDataset(*load_fashion_mnist(split, root), FASHION_MNIST_CLASSES)


# -- the preprocessed format --------------------------------------------------------------
def preprocess_images(source: str | os.PathLike, out_dir: str | os.PathLike, *, split: str = "train",
                      image_size: int | None = None, channels: int | None = None, overwrite: bool = False,
                      progress: bool = True, log=print) -> dict:
    """Write ``source`` ("fashion-mnist" or an image folder) as images.npy + labels.npy + manifest.json.

    Folder images all take the first image's channels and size unless ``channels`` /
    ``image_size`` are given; unreadable images and images of another size are counted
    (``stats.bad``) and skipped, never fatal. The output directory is locked for the run as the
    text pipeline's is (``fastpt._lock.PREPROCESS_LOCK``): a second run into it at the
    same time is refused naming the holder's pid (two runs wrote a dataset mixing both sources whose
    manifest verified). Temporary files carry the process id and are removed when a write fails.
    Returns the manifest.
    Raises ValueError (out_dir holds another dataset, without ``overwrite``; no readable image; out_dir
    in use by another run), FileNotFoundError, OSError naming the file that cannot be written (a full
    disk), TypeError / ValueError naming ``image_size`` / ``channels`` (checked first).
    """
    check_image_args(channels, image_size, "image_size")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock = lock_preprocess_output(out)
    try:
        if lock is not None:  # ours alone: what a killed run left is no other run's
            for f in out.glob("*.tmp"):
                if _LEFTOVER.fullmatch(f.name):
                    f.unlink()
        return _preprocess_images_locked(source, out, split, image_size, channels, overwrite, progress, log)
    finally:
        unlock_dir(lock)


# the temporary files of preprocess_images (see _tmp_name), removed at the start of a locked run
_LEFTOVER = re.compile(r"(images\.raw|images\.npy|labels\.npy)\.(\d+\.)?tmp")


def _tmp_name(path: Path, suffix: str = "") -> Path:
    """``path`` + ``suffix`` + ``.PID.tmp``: a run's temporary files are its own even without the lock
    (no ``flock`` on the filesystem)."""
    return path.with_name(f"{path.name}{suffix}.{os.getpid()}.tmp")


def _preprocess_images_locked(source, out: Path, split: str, image_size: int | None, channels: int | None,
                              overwrite: bool, progress: bool, log) -> dict:
    """preprocess_images once ``out`` exists and is locked."""
    if (out / MANIFEST).exists() and not overwrite:
        raise ValueError(f"output {out} already holds a dataset; pass --overwrite to replace it")
    bad = {"unreadable": 0, "size_mismatch": 0}
    if str(source) == "fashion-mnist":
        if image_size is not None or channels is not None:
            raise ValueError(f"{'image_size' if image_size is not None else 'channels'}: applies to image folders; "
                             f"fashion-mnist is stored as it comes (1 x 28 x 28)")
        images, labels = load_fashion_mnist(split)
        classes, desc = FASHION_MNIST_CLASSES, f"fashion-mnist:{split}"
        _save_npy(out / "images.npy", images)
    else:
        files, file_labels, classes = list_image_folder(source)
        desc = str(Path(source).resolve())
        from tqdm.auto import tqdm

        raw = _tmp_name(out / "images", ".raw")
        kept, shape = [], None
        try:
            try:
                with open(raw, "wb") as f:
                    for path, label in tqdm(list(zip(files, file_labels)), desc="images", unit="img",
                                            disable=not progress):
                        try:
                            img = load_image(path, channels=channels, size=image_size)
                        except ImportError:
                            raise
                        except (OSError, ValueError, SyntaxError):
                            bad["unreadable"] += 1
                            continue
                        if shape is None:
                            shape, channels = img.shape, img.shape[0]
                        if img.shape != shape:
                            bad["size_mismatch"] += 1
                            continue
                        f.write(img.tobytes())
                        kept.append(label)
            except OSError as exc:  # a full disk (a write, or the close flushing the rest): no file named
                if exc.filename is not None:
                    raise
                raise named_os_error(exc, raw) from exc
            if shape is None:
                raise ValueError(f"{source}: no readable image")
            src = np.memmap(raw, dtype=np.uint8, mode="r", shape=(len(kept), *shape))
            _save_npy(out / "images.npy", src)
            del src
        finally:
            unlink_quietly(raw)
        labels = np.asarray(kept, dtype=np.int64)
    _save_npy(out / "labels.npy", labels.astype(np.int64))
    shape = list(np.load(out / "images.npy", mmap_mode="r").shape)
    manifest = {"format": FORMAT, "version": VERSION, "kind": "images", "complete": True, "dtype": "uint8",
                "shape": shape, "classes": list(classes), "source": desc,
                "files": {k: {"file": f"{k}.npy", "sha256": sha256_file(out / f"{k}.npy"),
                              "bytes": (out / f"{k}.npy").stat().st_size} for k in ("images", "labels")},
                "stats": {"images": shape[0], "bad": bad}}
    write_json_atomic(out / MANIFEST, manifest)
    if log:
        bad_s = ", ".join(f"{k} {v}" for k, v in bad.items() if v) or "none"
        log(f"preprocess: {shape[0]:,} images {tuple(shape[1:])} uint8, {len(classes)} classes -> {out}; "
            f"bad images: {bad_s}")
    return manifest


def _save_npy(path: Path, array: np.ndarray, block: int = 4096) -> None:
    """``np.save`` in blocks of rows (bounded memory: ``array`` may be a memmap larger than RAM) to a
    temporary file, fsynced, then an atomic rename.

    The header (``np.lib.format.write_array_header_1_0``) and the rows are written with ordinary
    ``write`` calls: a disk without room then fails the write with ENOSPC. (Through ``open_memmap`` the
    file was sparse, and the first page the filesystem had no room for killed the process with SIGBUS, no
    message, the temporary files left filling the disk.) Raises OSError naming the temporary file; it is
    removed then and ``path`` left as it was.
    """
    tmp = _tmp_name(path)
    array = np.asarray(array) if not isinstance(array, np.ndarray) else array
    header = {"descr": np.lib.format.dtype_to_descr(array.dtype), "fortran_order": False,
              "shape": tuple(array.shape)}
    with replacing(path, tmp), open(tmp, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        for i in range(0, len(array), block):
            f.write(np.ascontiguousarray(array[i:i + block]).tobytes())
        f.flush()
        os.fsync(f.fileno())


def open_image_dataset(path: str | os.PathLike, *, verify: bool = True) -> ArrayImageDataset:
    """A preprocessed image directory as a dataset (memory-mapped).

    Checks the manifest and file sizes; with ``verify`` also the sha256 checksums.
    Raises FileNotFoundError, ValueError (not an image dataset), CorruptShardError (naming the file).
    """
    root = Path(path)
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise FileNotFoundError(f"{mpath}: no manifest; is {root} the output of fastpt preprocess --images?")
    manifest = read_json_object(mpath, CorruptShardError)
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION or not manifest.get("complete"):
        raise ValueError(f"{mpath}: not a finished fastpt image dataset (format {manifest.get('format')!r})")
    records = manifest.get("files")
    for k in ("images", "labels"):
        v = records.get(k) if isinstance(records, dict) else None
        if not (isinstance(v, dict) and isinstance(v.get("file"), str) and isinstance(v.get("sha256"), str)
                and isinstance(v.get("bytes"), int) and not isinstance(v.get("bytes"), bool)):
            raise CorruptShardError(f"{mpath}: files.{k} must be a record {{file, sha256, bytes}}, got {v!r} "
                                    "(damaged or edited manifest; rerun fastpt preprocess --images)")
    if not isinstance(manifest.get("classes", []), list):
        raise CorruptShardError(f"{mpath}: classes must be a list, got {manifest['classes']!r}")
    files = {k: verify_file(root, records[k]["file"], size=records[k]["bytes"],
                            sha256=records[k]["sha256"] if verify else None) for k in ("images", "labels")}
    images = np.load(files["images"], mmap_mode="r")
    labels = np.load(files["labels"], mmap_mode="r")
    return ArrayImageDataset(images, labels, manifest.get("classes", []))
