"""fastpt.bench.kernels' masking bench: what each MLM row is fed, and the notes that say so on every device."""
import sys

import pytest

from fastpt.bench import kernels
from fastpt.bench.kernels import Context

transformers = pytest.importorskip("transformers")


def test_hf_collator_is_timed_on_the_lists_run_mlm_prepares(monkeypatch):
    """The baseline got lists without special_tokens_mask and rebuilt the mask row by row in Python (~10% of
    its time); run_mlm.py passes the mask. The notes said only on CUDA that the collators start from lists
    and the kernel from a tensor."""
    seen = {}
    # the module bench_masking imports at run time: importing a transformers model class elsewhere (the
    # e2e tests) can replace sys.modules["transformers"], so the module imported above may be stale
    hf = sys.modules["transformers"]
    real = hf.DataCollatorForLanguageModeling

    class Recording(real):
        def __call__(self, features, *a, **kw):
            seen["hf"] = all("special_tokens_mask" in f for f in features)
            return super().__call__(features, *a, **kw)

    monkeypatch.setattr(hf, "DataCollatorForLanguageModeling", Recording)
    monkeypatch.setattr(kernels, "measure", lambda ctx, **kw: [
        dict(provider=name, note=(kw["notes"] or {}).get(name, ""), fn=fn) for name, fn in kw["providers"].items()]
        if kw["op"] == "masking" and kw["case"].startswith("mlm") else [])
    rows = {r["provider"]: r for r in kernels.bench_masking(Context(device="cpu", quick=True, log=lambda s: None))}
    rows["hf-collator"]["fn"]()
    assert seen["hf"] is True
    notes = {name: r["note"] for name, r in rows.items()}
    assert "special_tokens_mask" in notes["hf-collator"] and "lists" in notes["hf-collator"]
    assert "lists" in notes["fastpt-collator"]
    assert "ready (B, L) id tensor" in notes["fastpt"] and "lists-to-tensor" in notes["fastpt"]
    assert "ready (B, L) id tensor" in notes["torch-vectorised"]
