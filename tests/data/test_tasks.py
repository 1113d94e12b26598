"""fastpt.data.tasks' file writing: write_text_atomic never leaves half a file, nor its temporary file."""
import pathlib

import pytest

from fastpt.data.tasks import write_text_atomic


def test_write_text_atomic_removes_its_temporary_file_on_a_full_disk(tmp_path, monkeypatch):
    """`fastpt eval --out` on a full disk: the partial .results.json.PID.tmp stayed (filling the disk) and the
    error named no file. The temporary file is removed, the error names it, the earlier file is left as it was."""
    out = tmp_path / "results.json"
    write_text_atomic(out, "earlier")
    real = pathlib.Path.write_text

    def full(self, text, *args, **kwargs):
        real(self, text[:10], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", full)
    with pytest.raises(OSError, match="No space left on device") as exc:
        write_text_atomic(out, "x" * 1000)
    assert exc.value.errno == 28 and exc.value.filename.startswith(str(tmp_path / ".results.json."))
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"] and out.read_text() == "earlier"
    monkeypatch.undo()

    def interrupted(self, text, *args, **kwargs):
        real(self, text[:10], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(pathlib.Path, "write_text", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_text_atomic(out, "x" * 1000)
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
