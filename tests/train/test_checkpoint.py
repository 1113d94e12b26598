"""Checkpoints: atomic save, keep-last-N, checksum verification, fallback past a torn / corrupt one."""
import json
import random

import numpy as np
import pytest
import torch

from fastpt.train import checkpoint as ckpt


def write_model(d):
    """The two files a model directory holds (their content is not read here)."""
    torch.save({"w": torch.arange(10.0)}, d / "model.safetensors")
    (d / "fastpt_config.json").write_text("{}")


def save(root, step, keep_last=None):
    tensors, plain = ckpt.rng_state()
    return ckpt.save_checkpoint(root, step, write_model=write_model, optimizer_state={"state": {}, "param_groups": []},
                                trainer_state={"tokens": step * 10, "rng": plain},
                                rng_tensors={f"rank0.{k}": v for k, v in tensors.items()}, keep_last=keep_last)


def test_save_layout_and_load(tmp_path):
    path = save(tmp_path, 7)
    assert path.name == "step-00000007"
    names = {p.name for p in path.iterdir()}
    assert names == {"model.safetensors", "fastpt_config.json", "optimizer.pt", "rng.safetensors",
                     "trainer_state.json", "checkpoint.json"}
    manifest = ckpt.verify_checkpoint(path)
    assert manifest["step"] == 7 and set(manifest["files"]) == names - {"checkpoint.json"}
    loaded = ckpt.load_checkpoint(path)
    assert loaded["state"]["step"] == 7 and loaded["state"]["tokens"] == 70
    assert loaded["optimizer"] == {"state": {}, "param_groups": []}
    assert "rank0.torch_cpu" in loaded["rng"]
    assert not list(tmp_path.glob(".tmp-*"))


def test_keep_last_and_replace(tmp_path):
    for step in (1, 2, 3, 4):
        save(tmp_path, step, keep_last=2)
    assert [s for s, _ in ckpt.find_checkpoints(tmp_path)] == [3, 4]
    save(tmp_path, 4, keep_last=2)  # the same step again replaces it
    assert [s for s, _ in ckpt.find_checkpoints(tmp_path)] == [3, 4]
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000004"


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_file", "no_manifest", "bad_manifest"])
def test_corrupt_latest_falls_back(tmp_path, damage):
    save(tmp_path, 1)
    newest = save(tmp_path, 2)
    target = newest / "model.safetensors"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-5])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "delete_file":
        target.unlink()
    elif damage == "no_manifest":
        (newest / "checkpoint.json").unlink()
    else:
        (newest / "checkpoint.json").write_text("{not json")
    with pytest.raises(ckpt.CorruptCheckpointError, match=r"step-00000002"):
        ckpt.verify_checkpoint(newest)
    warnings = []
    assert ckpt.latest_checkpoint(tmp_path, warn=warnings.append).name == "step-00000001"
    assert "step-00000002 is unusable" in warnings[0] and "step-00000001" in warnings[-1]


@pytest.mark.parametrize("edit", ["list_nothing", "drop_model", "drop_optimizer"])
def test_a_manifest_must_list_what_every_save_writes(tmp_path, edit):
    """A checkpoint.json that lists no files (or leaves out model.safetensors) verified, and the resume then
    crashed on the missing file; one that left out optimizer.pt verified and the file loaded unchecked."""
    save(tmp_path, 1)
    newest = save(tmp_path, 2)
    manifest = json.loads((newest / "checkpoint.json").read_text())
    if edit == "list_nothing":
        manifest["files"] = {}
    else:
        manifest["files"].pop("model.safetensors" if edit == "drop_model" else "optimizer.pt")
    (newest / "checkpoint.json").write_text(json.dumps(manifest))
    with pytest.raises(ckpt.CorruptCheckpointError, match=r"does not list .*model.safetensors|optimizer.pt: not listed"):
        ckpt.verify_checkpoint(newest)
    assert ckpt.latest_checkpoint(tmp_path, warn=lambda m: None).name == "step-00000001"


def test_all_corrupt_raises_and_none_is_none(tmp_path):
    assert ckpt.latest_checkpoint(tmp_path / "nothing") is None
    only = save(tmp_path, 5)
    (only / "trainer_state.json").write_text("{}")
    with pytest.raises(ckpt.CorruptCheckpointError, match="no usable checkpoint"):
        ckpt.latest_checkpoint(tmp_path, warn=lambda m: None)


def test_partial_save_is_ignored_and_cleaned(tmp_path):
    save(tmp_path, 1)
    torn = tmp_path / ".tmp-step-00000002-123"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"half")
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000001"
    assert ckpt.clean_partial(tmp_path) == [torn] and not torn.exists()


def test_keep_last_never_prunes_the_new_checkpoint_for_newer_stale_ones(tmp_path):
    """A resume that fell back past a corrupt newest checkpoint (step 9) saves steps 7, 8: keep_last counts
    only checkpoints older than the one just written (it deleted 6 and 7, keeping the corrupt 9)."""
    for step in (6, 9):
        save(tmp_path, step)
    save(tmp_path, 7, keep_last=1)
    assert [s for s, _ in ckpt.find_checkpoints(tmp_path)] == [7, 9]
    save(tmp_path, 8, keep_last=2)
    assert [s for s, _ in ckpt.find_checkpoints(tmp_path)] == [7, 8, 9]


def test_a_failed_write_removes_its_partial_directory_and_names_the_checkpoint(tmp_path):
    """A full disk while saving: CheckpointWriteError (an OSError) naming the checkpoint, no .tmp-* left
    to fill the disk, the earlier checkpoints intact."""
    save(tmp_path, 1)

    def full(d):
        (d / "model.safetensors").write_bytes(b"part")
        raise OSError(28, "No space left on device")

    with pytest.raises(ckpt.CheckpointWriteError, match=r"checkpoint .*step-00000002: could not be written .*No space"):
        ckpt.save_checkpoint(tmp_path, 2, write_model=full, optimizer_state=None, trainer_state={}, rng_tensors={})
    assert not list(tmp_path.glob(".tmp-*")) and ckpt.latest_checkpoint(tmp_path).name == "step-00000001"


def test_an_error_of_any_exception_class_is_a_checkpoint_write_error(tmp_path):
    """safetensors reports a full disk as SafetensorError, an Exception outside (OSError, RuntimeError,
    ValueError): the save ended in a traceback and left its .tmp directory on the full disk. A first save
    says there is no earlier checkpoint (it said they were intact)."""
    class SafetensorLike(Exception):
        pass

    def full(d):
        (d / "model.safetensors").write_bytes(b"part")
        raise SafetensorLike("No space left on device (os error 28)")

    with pytest.raises(ckpt.CheckpointWriteError, match=r"SafetensorLike: No space.*no earlier checkpoint exists"):
        ckpt.save_checkpoint(tmp_path, 1, write_model=full, optimizer_state=None, trainer_state={}, rng_tensors={})
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("complete_new", [True, False])
def test_a_kill_between_the_renames_of_a_replaced_checkpoint_loses_neither(tmp_path, complete_new):
    """Replacing step 5 renames the old one aside, then the new one into place; killed in between,
    both carried .tmp-* names and clean_partial deleted both. The complete new one is put in place, or
    else the old one back."""
    import shutil

    old = save(tmp_path, 5)
    os_rename_target = tmp_path / ".tmp-old-step-00000005-77"
    new = tmp_path / ".tmp-step-00000005-77"
    shutil.copytree(old, new)
    if not complete_new:
        (new / "checkpoint.json").unlink()  # killed before its manifest: not complete
    old.rename(os_rename_target)
    ckpt.clean_partial(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000005"]
    ckpt.verify_checkpoint(tmp_path / "step-00000005")


def test_run_directory_is_accepted(tmp_path):
    save(tmp_path / "checkpoints", 3)
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000003"


def test_rng_round_trip():
    tensors, plain = ckpt.rng_state()
    json.dumps(plain)  # JSON-serialisable
    expect = (torch.rand(3), random.random(), np.random.rand())
    torch.rand(5), random.random(), np.random.rand(4)  # move every generator on
    ckpt.set_rng_state(tensors, plain)
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expect[0]) and got[1] == expect[1] and got[2] == expect[2]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_file_of_a_checkpoint_has_the_umasks_mode(tmp_path, umask):
    """safetensors writes through mkstemp, mode 0600 whatever the umask: rng.safetensors (and the model's
    weights) were unreadable to another user or container uid who read the checkpoint's JSON files (0644),
    and loading there said FileNotFoundError. Every file now has the mode the umask gives."""
    import os
    import stat

    import fastpt

    model = fastpt.build("bert-tiny", backbone={"vocab_size": 97, "max_positions": 32, "num_layers": 1},
                         special_ids={"mask": 3, "pad": 0, "cls": 1, "sep": 2})
    old = os.umask(umask)
    try:
        tensors, plain = ckpt.rng_state()
        path = ckpt.save_checkpoint(tmp_path, 1, write_model=model.save_pretrained, optimizer_state={"state": {}},
                                    trainer_state={"rng": plain}, rng_tensors=tensors)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.iterdir()}
    assert modes == dict.fromkeys(modes, 0o666 & ~umask) and "rng.safetensors" in modes, modes
    ckpt.load_checkpoint(path)
