"""Image datasets: IDX parsing, fashion-mnist (Debian package), image folders (PGM/PPM without
Pillow, a clear error for other formats), and the preprocessed images.npy format with checksums."""
import gzip
import json
import struct
import sys

import numpy as np
import pytest
import torch

from fastpt.data.images import (ImageFolder, fashion_mnist, find_fashion_mnist, list_image_folder, load_fashion_mnist,
                                load_image, open_image_dataset, preprocess_images, read_idx)
from fastpt.data.preprocess import preprocess_main
from fastpt.data.shards import CorruptShardError
from tests.helpers import FullDisk


def _has_fashion_mnist():
    try:
        find_fashion_mnist()
        return True
    except FileNotFoundError:
        return False


needs_fmnist = pytest.mark.skipif(not _has_fashion_mnist(), reason="apt-get install dataset-fashion-mnist")


def _write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if str(path).endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _write_pnm(path, img):
    """img: (H, W) grey -> P5, (H, W, 3) -> P6."""
    magic = b"P5" if img.ndim == 2 else b"P6"
    path.write_bytes(magic + b"\n# made by a test\n%d %d\n255\n" % (img.shape[1], img.shape[0]) + img.tobytes())


def test_read_idx(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    for name in ("x-idx3-ubyte", "x-idx3-ubyte.gz"):
        _write_idx(tmp_path / name, arr)
        out = read_idx(tmp_path / name)
        assert out.dtype == np.uint8 and np.array_equal(out, arr)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes((tmp_path / "x-idx3-ubyte").read_bytes()[:-1])
    with pytest.raises(ValueError, match="header says"):
        read_idx(tmp_path / "short")


def test_fashion_mnist_from_a_directory(tmp_path):
    rng = np.random.default_rng(1)
    images, labels = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8), np.arange(6) % 10
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    x, y = load_fashion_mnist("test", root=tmp_path)
    assert x.shape == (6, 1, 28, 28) and x.dtype == np.uint8 and y.dtype == np.int64
    assert np.array_equal(x[:, 0], images) and y.tolist() == labels.tolist()
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        find_fashion_mnist(tmp_path / "nowhere")


@needs_fmnist
def test_debian_fashion_mnist():
    ds = fashion_mnist("test")
    assert len(ds) == 10_000 and ds.classes[9] == "Ankle boot"
    img, label = ds[0]
    assert img.dtype == torch.uint8 and img.shape == (1, 28, 28) and 0 <= label < 10
    assert sorted(set(ds.labels.tolist())) == list(range(10))


@pytest.fixture()
def image_folder(tmp_path):
    """cats/ (2 RGB PPM), dogs/ (1 grey PGM, 1 corrupt file, 1 of another size)."""
    rng = np.random.default_rng(2)
    root = tmp_path / "imgs"
    for d in ("cats", "dogs"):
        (root / d).mkdir(parents=True)
    rgb = [rng.integers(0, 256, (5, 6, 3), dtype=np.uint8) for _ in range(2)]
    grey = rng.integers(0, 256, (5, 6), dtype=np.uint8)
    _write_pnm(root / "cats" / "a.ppm", rgb[0])
    _write_pnm(root / "cats" / "b.ppm", rgb[1])
    _write_pnm(root / "dogs" / "c.pgm", grey)
    (root / "dogs" / "d.pgm").write_bytes(b"P5\n6 5\n65535\n")  # 16-bit: unreadable without Pillow
    _write_pnm(root / "dogs" / "e.pgm", rng.integers(0, 256, (4, 4), dtype=np.uint8))
    (root / "dogs" / "notes.txt").write_text("not an image")
    return root, rgb, grey


def test_image_folder(image_folder):
    root, rgb, grey = image_folder
    files, labels, classes = list_image_folder(root)
    assert classes == ["cats", "dogs"] and labels == [0, 0, 1, 1, 1] and [f.name for f in files][:3] == \
        ["a.ppm", "b.ppm", "c.pgm"]
    ds = ImageFolder(root, channels=3)
    img, label = ds[0]
    assert img.dtype == torch.uint8 and img.shape == (3, 5, 6) and label == 0
    assert np.array_equal(img.numpy(), rgb[0].transpose(2, 0, 1))
    grey3, label = ds[2]
    assert label == 1 and np.array_equal(grey3.numpy(), np.stack([grey] * 3))
    assert np.array_equal(load_image(files[2]), grey[None])  # its own channel count by default
    with pytest.raises(FileNotFoundError):
        list_image_folder(root / "cats" / "a.ppm")


def test_png_without_pillow_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)  # import PIL raises ImportError
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(ImportError, match="pip install pillow"):
        load_image(tmp_path / "x.png")


def _pnm_bytes(magic, samples, maxval, width):
    """A P5 / P6 file of ``samples`` (row-major, interleaved RGB for P6), 2-byte big-endian above maxval 255."""
    c = 1 if magic == b"P5" else 3
    body = np.asarray(samples, dtype=">u2" if maxval > 255 else np.uint8).tobytes()
    return magic + b"\n%d %d\n%d\n" % (width, len(samples) // (width * c), maxval) + body


def _pillow_pnm(v, maxval, grey):
    """Pillow's PNM decoder (PpmDecoder.decode) then 16-bit grey -> 8 bit as load_image scales it."""
    if grey and maxval > 255:  # Pillow's mode I: round(v / maxval * 65535), then v * 255 / 65535 rounded
        return round(min(65535, round(v / maxval * 65535)) * 255 / 65535)
    return min(255, round(v / maxval * 255))


@pytest.mark.parametrize("magic", [b"P5", b"P6"])
@pytest.mark.parametrize("maxval", [1, 15, 200, 255, 256, 4095, 65535])
def test_pnm_maxval_is_rescaled_as_pillow_does(tmp_path, magic, maxval):
    """PGM/PPM with maxval < 255 were read unscaled (a 4-bit PGM came out 0..15: near black) and
    16-bit ones refused, while Pillow (the resize / eval path) stretches them to 0..255."""
    c = 1 if magic == b"P5" else 3
    samples = np.linspace(0, maxval, 6 * 6 * c).round().astype(np.int64)  # a ramp over the levels, square image
    if maxval < 255:
        samples[-1] = maxval + 1  # above maxval: Pillow caps it at white
    path = tmp_path / ("x.pgm" if c == 1 else "x.ppm")
    path.write_bytes(_pnm_bytes(magic, samples.tolist(), maxval, 6))
    want = np.array([_pillow_pnm(int(v), maxval, c == 1) for v in samples], dtype=np.uint8)
    img = load_image(path)  # without Pillow
    assert img.dtype == np.uint8 and img.shape == (c, 6, 6)
    assert np.array_equal(img, want.reshape(6, 6, c).transpose(2, 0, 1))
    assert img.max() == 255
    pytest.importorskip("PIL")
    assert np.array_equal(load_image(path, size=6), img)  # Pillow's path (same size: no resampling) agrees


def test_bad_pnm_headers_name_the_file(tmp_path):
    for name, data in (("zero.pgm", b"P5\n2 1\n0\n\x00\x00"), ("big.pgm", b"P5\n2 1\n70000\n" + bytes(8)),
                       ("short.pgm", b"P5\n4 4\n255\n" + bytes(5)), ("plain.pgm", b"P2\n1 1\n255\n0\n")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=name):
            load_image(tmp_path / name)


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    """Pillow's convert("L") clips 16-bit grey (I;16) at 255: a 0..65535 ramp came out 0 or 255."""
    Image = pytest.importorskip("PIL.Image")
    ramp = np.linspace(0, 65535, 7 * 7).round().astype(np.uint16).reshape(7, 7)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    with Image.open(tmp_path / "ramp.png") as im:
        assert im.mode == "I;16"
    want = np.array([round(int(v) * 255 / 65535) for v in ramp.ravel()], dtype=np.uint8).reshape(1, 7, 7)
    assert np.array_equal(load_image(tmp_path / "ramp.png"), want)
    assert np.array_equal(load_image(tmp_path / "ramp.png", channels=3), np.repeat(want, 3, 0))
    assert np.array_equal(load_image(tmp_path / "ramp.png", size=7), want)
    Image.fromarray(ramp.astype(np.int32)).save(tmp_path / "wide.tif")  # Pillow mode I (32-bit ints)
    with Image.open(tmp_path / "wide.tif") as im:
        assert im.mode == "I"
    assert np.array_equal(load_image(tmp_path / "wide.tif"), want)  # values within 16 bit: the same convention
    Image.fromarray(np.array([[0, 70000]], dtype=np.int32)).save(tmp_path / "over.tif")
    with pytest.raises(ValueError, match=r"over\.tif.*mode I.*70000"):
        load_image(tmp_path / "over.tif")


def test_preprocess_folder_round_trip_and_checksums(tmp_path, image_folder):
    root, rgb, grey = image_folder
    out = tmp_path / "out"
    manifest = preprocess_images(root, out, channels=3, progress=False, log=None)
    assert manifest["shape"] == [3, 3, 5, 6] and manifest["stats"]["bad"] == {"unreadable": 1, "size_mismatch": 1}
    ds = open_image_dataset(out)
    assert len(ds) == 3 and ds.classes == ["cats", "dogs"] and ds.labels.tolist() == [0, 0, 1]
    img, label = ds[1]
    assert img.dtype == torch.uint8 and np.array_equal(img.numpy(), rgb[1].transpose(2, 0, 1))
    with pytest.raises(ValueError, match="overwrite"):
        preprocess_images(root, out, progress=False, log=None)
    data = bytearray((out / "images.npy").read_bytes())
    data[-1] ^= 0xFF
    (out / "images.npy").write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match="images.npy.*sha256"):
        open_image_dataset(out)
    assert len(open_image_dataset(out, verify=False)) == 3
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"]["labels"]["file"] == "labels.npy"


@needs_fmnist
def test_get_images_is_a_batch_of_the_items(tmp_path, image_folder):
    """``get_images`` gives the images of ``indices`` as one uint8 (B, C, H, W) batch: the memory-mapped arrays
    in one gather (repeats and any order), a folder image by image."""
    root, rgb, grey = image_folder
    out = tmp_path / "out"
    preprocess_images(root, out, channels=3, progress=False, log=None)
    arrays = open_image_dataset(out)
    idx = [2, 0, 2, 1]
    batch = arrays.get_images(np.asarray(idx))
    assert batch.dtype == torch.uint8 and batch.shape == (4, 3, 5, 6) and batch.is_contiguous()
    assert torch.equal(batch, torch.stack([arrays[i][0] for i in idx]))
    assert torch.equal(arrays.get_images(idx), batch)  # a list as well
    with pytest.raises(IndexError):
        arrays.get_images([3])
    folder = ImageFolder(root / "cats", channels=3)
    assert torch.equal(folder.get_images([1, 0]), torch.stack([folder[1][0], folder[0][0]]))


def test_cli_fashion_mnist(tmp_path, capsys):
    assert preprocess_main(["--images", "fashion-mnist", "--split", "test", str(tmp_path / "fm")]) == 0
    assert "10,000 images (1, 28, 28)" in capsys.readouterr().out
    ds = open_image_dataset(tmp_path / "fm")
    x, y = load_fashion_mnist("test")
    assert np.array_equal(ds.images, x) and np.array_equal(ds.labels, y)


def test_folder_classes_need_images_and_loose_images_beside_them_are_an_error(tmp_path):
    """A subfolder without images is no class (5 loose images and an empty folder: an unlabelled set);
    images directly in the root beside class folders would be neither labelled nor a set of their own:
    an error naming them, not a silent drop."""
    grey = np.arange(30, dtype=np.uint8).reshape(5, 6)
    for i in range(5):
        _write_pnm(tmp_path / f"{i}.pgm", grey)
    (tmp_path / "empty").mkdir()
    files, labels, classes = list_image_folder(tmp_path)
    assert len(files) == 5 and labels == [-1] * 5 and classes == []
    (tmp_path / "extra").mkdir()
    _write_pnm(tmp_path / "extra" / "x.pgm", grey)
    with pytest.raises(ValueError, match=r"5 images directly in it \(e.g. 0.pgm\) beside the class folders \['extra'\]"):
        list_image_folder(tmp_path)


def test_fashion_mnist_refuses_resizing_options(tmp_path):
    """image_size / channels apply to image folders: fashion-mnist would have ignored them silently."""
    with pytest.raises(ValueError, match="image_size: applies to image folders"):
        preprocess_images("fashion-mnist", tmp_path / "fm", image_size=32, progress=False, log=None)


def _full_disk_for(monkeypatch, name_part, room=100):
    """``open`` in fastpt.data.images: files whose name holds ``name_part`` get ``room`` bytes."""
    import builtins

    import fastpt.data.images as images_mod

    def fake_open(path, mode="r", *args, **kwargs):
        f = builtins.open(path, mode, *args, **kwargs)
        return FullDisk(f, room) if "w" in mode and name_part in str(path) else f

    monkeypatch.setattr(images_mod, "open", fake_open, raising=False)


@pytest.mark.parametrize("name_part", ["images.raw", "images.npy"])
def test_a_full_disk_removes_the_temporary_files_and_names_the_file(tmp_path, image_folder, monkeypatch, name_part):
    """preprocess --images on a nearly full disk: images.npy was written through np.lib.format.open_memmap on a
    sparse file, and the first page without room killed the process with SIGBUS, no message, images.raw.tmp and
    images.npy.tmp left filling the disk; a full disk while writing images.raw.tmp said "[Errno 28] No space left
    on device" naming no file and left it. Both writes are plain writes now: ENOSPC naming the temporary file,
    every temporary file removed, the lock released."""
    from fastpt.data.preprocess import LOCK_FILE

    root, _, _ = image_folder
    out = tmp_path / "out"
    _full_disk_for(monkeypatch, name_part)
    with pytest.raises(OSError, match="No space left") as exc:
        preprocess_images(root, out, channels=3, progress=False, log=None)
    assert exc.value.errno == 28 and name_part in str(exc.value.filename), exc.value
    assert sorted(p.name for p in out.iterdir()) == []  # no .tmp, no lock file, no manifest
    monkeypatch.undo()
    preprocess_images(root, out, channels=3, progress=False, log=None)  # room again: the run goes through
    assert len(open_image_dataset(out)) == 3 and not (out / LOCK_FILE).exists()


def test_the_npy_files_are_what_np_save_writes(tmp_path):
    """_save_npy writes the header and the rows itself (in blocks): byte for byte np.save's file."""
    from fastpt.data.images import _save_npy

    for array in (np.arange(2 * 3 * 4 * 5, dtype=np.uint8).reshape(2, 3, 4, 5), np.arange(7, dtype=np.int64),
                  np.zeros((0, 1, 2, 2), np.uint8)):
        _save_npy(tmp_path / "a.npy", array, block=1)
        np.save(tmp_path / "b.npy", array)
        assert (tmp_path / "a.npy").read_bytes() == (tmp_path / "b.npy").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "b.npy"]


def test_a_second_run_into_the_same_output_is_refused_and_temporary_names_are_per_process(tmp_path, image_folder,
                                                                                        monkeypatch):
    """Two `fastpt preprocess --images` into one OUT at once (no lock, fixed names images.raw.tmp /
    images.npy.tmp) wrote a dataset mixing both sources whose manifest verified. The run holds the text
    pipeline's lock (refusal names the holder's pid); its temporary files carry its pid, and those a killed
    run left are removed."""
    import os
    import subprocess

    from fastpt.data.preprocess import LOCK_FILE

    root, _, _ = image_folder
    out = tmp_path / "out"
    out.mkdir()
    code = (f"import time; from fastpt._lock import lock_dir; lock_dir({str(out)!r}, {LOCK_FILE!r}, 'x'); "
            "print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=rf"output {out} is in use by another fastpt preprocess run "
                                             rf"\(pid {holder.pid}"):
            preprocess_images(root, out, progress=False, log=None)
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # the holder's, nothing written
    (out / "images.raw.tmp").write_bytes(b"left by a killed run")
    (out / "images.npy.12345.tmp").write_bytes(b"left by a killed run")
    renamed = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append(os.path.basename(a)), real_replace(a, b))[1])
    preprocess_images(root, out, channels=3, progress=False, log=None)
    assert {n for n in renamed if "npy" in n} == {f"images.npy.{os.getpid()}.tmp", f"labels.npy.{os.getpid()}.tmp"}
    assert sorted(p.name for p in out.iterdir()) == ["images.npy", "labels.npy", "manifest.json"]
