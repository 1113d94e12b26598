"""Compile fastpt's Triton kernels for a GPU on any machine, and report what each launch costs the chip.

Triton compiles for a named target without a GPU present (``triton.compile`` with a ``GPUTarget``;
ptxas ships in Triton's wheel). That checks what the CPU interpreter cannot: that every kernel in
the launch configs fastpt uses goes through Triton's compiler for the architecture at all, and how
many registers per thread it needs, how many bytes it spills to local memory, how much shared
memory it takes and whether its products became Hopper ``wgmma`` instructions. These are compile
facts, not speed: a spill-free kernel can still be slow, but a spilling one, or one that does not
fit in shared memory, is slow or refused on every GPU of that architecture, found here before any
GPU time is spent.

``python -m fastpt.bench.aot [--arch 90] [--all-candidates] [--out F.md]`` prints a table (and
writes it as Markdown). ``check()`` compiles the default config of every kernel and returns the
failures; the tests call it in a subprocess, because under ``TRITON_INTERPRET=1`` (the CPU test
path) ``triton.jit`` hands out interpreter functions, which cannot be compiled.

Kernel specs mirror the launches in ``ops/*.py``: the same configs (each module's own config
function where it has one, evaluated for an H100: 132 SMs, 227 KiB of shared memory a program),
the argument types of a bf16 (or fp32) call, 32-bit integer sizes. Every Triton kernel of the
package is in one of the sets: attention, contrastive (tiled), contrastive_blas (the chunk kernels),
others (linear cross-entropy, dropout, MLM and MAE masking).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
from typing import Callable

import torch

H100_SMS = 132
SMEM = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}  # opt-in shared memory per program


@dataclasses.dataclass
class Spec:
    """One kernel launch to compile: ``fn`` with argument ``types`` ("*bf16", "i32", "fp32"; others i32)."""
    op: str
    kernel: str
    case: str
    fn: object
    types: dict
    constexprs: dict
    num_warps: int
    num_stages: int
    divisible: tuple = ()  # integer arguments that are multiples of 16 in a typical launch


@dataclasses.dataclass
class Resources:
    op: str
    kernel: str
    case: str
    config: str
    regs: int | None = None
    local_bytes: int | None = None  # stack frame per thread: spilled registers
    spill_stores: int | None = None  # STL instructions in the SASS
    loop_instructions: int | None = None  # SASS instructions of the longest loop body
    loop_exps: int | None = None  # MUFU.EX2 (exp2) in that body: about one per score element a thread handles
    shared_bytes: int | None = None
    wgmma: int | None = None
    error: str | None = None


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def available() -> str | None:
    """Why kernels cannot be compiled here, or None."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    from .. import _native

    if _native.triton_interpreting():
        return "TRITON_INTERPRET=1: triton.jit gives interpreter functions (run in a process without it)"
    if not os.path.exists(_tool("ptxas")) or not os.path.exists(_tool("cuobjdump")):
        return "Triton's NVIDIA tools (ptxas, cuobjdump) are not in its wheel"
    return None


def _signature(fn, types: dict, constexprs: dict) -> dict:
    sig = {}
    for p in fn.params:
        sig[p.name] = "constexpr" if p.name in constexprs else types.get(p.name, "i32")
    return sig


def _attrs(spec: Spec) -> dict:
    """What Triton's launcher tells the compiler about a real call's arguments: pointers 16-byte
    aligned (every torch allocation, and views at multiples of 8 half elements), and the integers
    ``spec.divisible`` multiples of 16 (strides of (B, S, H, 64) tensors, power-of-two sizes). Without
    it the compiler cannot vectorise a load (one 16-bit load per element), and the resources are not
    those of the kernels that run."""
    sig = _signature(spec.fn, spec.types, spec.constexprs)
    return {(i,): [["tt.divisibility", 16]] for i, p in enumerate(spec.fn.params)
            if sig[p.name] != "constexpr" and (sig[p.name].startswith("*") or p.name in spec.divisible)}


def compile_spec(spec: Spec, arch: int = 90) -> Resources:
    """Compile one launch for ``sm_<arch>`` and read its resources from the cubin."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cfg = ", ".join(f"{k}={v}" for k, v in spec.constexprs.items() if k.isupper() and k.startswith(("B", "D")))
    res = Resources(spec.op, spec.kernel, spec.case, f"{cfg}, warps={spec.num_warps}, stages={spec.num_stages}")
    try:
        src = ASTSource(fn=spec.fn, signature=_signature(spec.fn, spec.types, spec.constexprs),
                        constexprs=spec.constexprs, attrs=_attrs(spec))
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                           options=dict(num_warps=spec.num_warps, num_stages=spec.num_stages))
    except Exception as e:  # noqa: BLE001 - reported per kernel: the point of this module
        res.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200] if str(e).strip() else ''}"
        return res
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    try:
        out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             timeout=60).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True, timeout=60).stdout
    finally:
        os.unlink(f.name)
    res.spill_stores = len(re.findall(r"\bSTL(\.\w+)*\s", sass))
    loops = _loops(sass)
    if loops:
        res.loop_instructions, res.loop_exps = max(loops)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", out)
    if m:  # a Triton kernel's stack frame holds its spilled registers (it has no local arrays)
        res.regs, res.local_bytes = int(m.group(1)), int(m.group(2))
        res.shared_bytes = int(m.group(3)) + int(k.metadata.shared)
    res.wgmma = k.asm["ptx"].count("wgmma.mma_async")
    return res


def _loops(sass: str) -> list[tuple[int, int]]:
    """(instructions, exp2 instructions) of each loop in a SASS listing: a branch back to an earlier
    address closes a loop whose body runs from that address to the branch. The compiler may unroll a
    loop (two iterations in one body), so compare kernels by instructions per exp2, which for an
    attention or contrastive tile loop is the instructions a thread issues per score element."""
    addrs, texts = [], []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            addrs.append(int(m.group(1), 16))
            texts.append(m.group(2))
    index = {a: i for i, a in enumerate(addrs)}
    out = []
    for i, (a, t) in enumerate(zip(addrs, texts)):
        target = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", t)
        if target and int(target.group(1), 16) < a and int(target.group(1), 16) in index:
            body = texts[index[int(target.group(1), 16)]:i + 1]
            out.append((len(body), sum("MUFU.EX2" in x for x in body)))
    return out


# ----------------------------------------------------------------------------- kernel specs


def _attention_specs(all_candidates: bool) -> list[Spec]:
    from ..ops import attention_triton as at

    specs = []
    ptr = {n: "*bf16" for n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
    types = dict(ptr, LSE="*fp32", DELTA="*fp32", DOCS="*i32", qk_scale="fp32", scale="fp32", rescale="fp32")
    kernels = {"fwd": at._fwd_kernel, "dkdv": at._bwd_dkdv_kernel, "dq": at._bwd_dq_kernel}
    strides = tuple(f"s{t}_{x}" for t in ("q", "k", "v", "o", "d", "dq", "dk", "dv") for x in "bsh")
    div = strides + ("Sq", "LEN_BUCKET")
    for hd in (64, 128):
        for kind, fn in kernels.items():
            cands = at._configs(kind, hd, False)
            for bm, bn, warps, stages in (cands if all_candidates else cands[:1]):
                for dropout in (False, True):
                    c = dict(HEAD_DIM=hd, BLOCK_D=hd, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=False, DROPOUT=dropout,
                             UPCAST=False, PREC="tf32")
                    if kind == "fwd":
                        c["FOLD_SCALE"] = True
                    specs.append(Spec("attention", kind, f"bf16 hd{hd}" + (" dropout" if dropout else ""), fn, types,
                                      c, warps, stages, div))
        specs.append(Spec("attention", "delta", f"bf16 hd{hd}", at._bwd_delta_kernel, types,
                          dict(HEAD_DIM=hd, BLOCK_D=hd, BLOCK_M=at.DELTA_BLOCK), 4, 3, div))
    return specs


def _contrastive_specs(arch: int, all_candidates: bool) -> list[Spec]:
    from ..ops import contrastive_triton as ct

    specs = []
    for dtype, name, d in ((torch.bfloat16, "bf16", 128), (torch.bfloat16, "bf16", 256),
                           (torch.bfloat16, "bf16", 512), (torch.bfloat16, "bf16", 768), (torch.float32, "fp32", 512)):
        el = f"*{name}"
        for kind in ct.KINDS:
            cands = ct.candidates(dtype, d, kind, sms=H100_SMS, smem=SMEM.get(arch, 99 * 1024))
            for cfg in (cands if all_candidates else cands[:1]):
                # CLIP's launches: symmetric, positives in the kernel, the scale's gradient in G_q's
                launch = cfg.launch(kind, symmetric=True, excl=False, upcast=False, pos=True, gscale=kind == "grad_q")
                warps, stages = launch.pop("num_warps"), launch.pop("num_stages")
                case = f"{name} D{d} symmetric, {'resident' if cfg.resident else 'chunked'}"
                if kind == "fwd":
                    types = dict(q_ptr=el, k_ptr=el, queue_ptr=el, **{n: "*fp32" for n in (
                        "scale_ptr", "row_m_ptr", "row_s_ptr", "col_m_ptr", "col_s_ptr")})
                    specs.append(Spec("contrastive", kind, case, ct._fwd_kernel, types, launch, warps, stages,
                                      ("N", "M", "D")))
                    continue
                types = dict(a_ptr=el, b_ptr=el, queue_ptr=el, out_ptr=el, **{n: "*fp32" for n in (
                    "scale_ptr", "row_lse_ptr", "col_lse_ptr", "g_row_ptr", "g_col_ptr", "g_pos_ptr", "out_scale_ptr",
                    "g_scale_ptr")})
                specs.append(Spec("contrastive", kind, case, ct._bwd_kernel, types, launch, warps, stages,
                                  ("n_a", "n_b", "D")))
    return specs


def _blas_chunk_specs() -> list[Spec]:
    """The blas contrastive backend's chunk kernels at N = 16384 (1024-row chunks of float32 scores)."""
    from ..ops import contrastive_blas_triton as cb

    rows, cols = 1024, 16384
    DIV = ("stride", "ds_stride", "n_rows", "n_cols", "r0", "m")  # noqa: N806 - sizes of N = 16384
    f32 = {n: "*fp32" for n in ("S", "scale_ptr", "ROW_LSE", "COL_MAX", "COL_SUM", "G_ROW", "COL_LSE", "G_COL",
                                "G_POS")}
    specs = []
    br, bn, w = cb._blocks(rows, cols, cb.ROW_BLOCK_N)
    specs.append(Spec("contrastive_blas", "row_lse", "fp32 scores", cb._row_lse_kernel, f32,
                      dict(EXCL=True, BLOCK_R=br, BLOCK_N=bn), w, 3, DIV))
    br, bc, w = cb._blocks(rows, cols, cb.COL_BLOCK_C)
    specs.append(Spec("contrastive_blas", "col_lse", "fp32 scores", cb._col_lse_kernel, f32,
                      dict(EXCL=True, BLOCK_R=br, BLOCK_C=bc), w, 3, DIV))
    br, bn, w = cb._blocks(rows, cols, cb.DS_BLOCK_N)
    for ds in ("bf16", "fp32"):  # CLIP's chunks: symmetric, with positives (NT-Xent's exclusion too)
        specs.append(Spec("contrastive_blas", "dscores", f"dS {ds}, symmetric, positives", cb._dscores_kernel,
                          dict(f32, DS=f"*{ds}", TARGETS="*i64"), dict(SYM=True, EXCL=True, POS=True, BLOCK_R=br,
                                                                        BLOCK_N=bn), w, 3, DIV))
    return specs


def _small_kernel_specs() -> list[Spec]:
    """Linear cross-entropy's chunk kernel (GPT-2's vocabulary), dropout, MLM masking, MAE masking: the
    launches of ops/*.py on a GPU."""
    import importlib

    # fastpt.ops exports functions named like these modules: import the modules themselves
    dt, lce, mm, rm = (importlib.import_module(f"fastpt.ops.{m}") for m in (
        "dropout_triton", "linear_cross_entropy", "mlm_mask", "random_masking"))

    block_m, block_v, warps = lce.gpu_tiles(50257)
    specs = [Spec("linear_cross_entropy", "ce_chunk", f"bf16 logits, V 50257, {grad}", lce._ce_chunk_kernel,
                  dict(z_ptr="*bf16", g_ptr="*bf16", y_ptr="*i64", scale_ptr="*fp32", loss_ptr="*fp32",
                       lse_ptr="*fp32", smoothing="fp32", z_coef="fp32"),
                  dict(WRITE_GRAD=grad == "gradient", SMOOTH=True, BLOCK_M=block_m, BLOCK_V=block_v), warps, 3)
             for grad in ("gradient", "loss only")]
    specs.append(Spec("dropout", "dropout", "bf16", dt._dropout_kernel, dict(X="*bf16", OUT="*bf16", scale="fp32"),
                      dict(BLOCK=dt.GPU_BLOCK, BIG=False), dt.GPU_WARPS, 3, ("n",)))
    specs.append(Spec("mlm_mask", "mlm", "int64 ids, 512 columns", mm._mlm_kernel,
                      {n: "*i64" for n in ("ids_ptr", "out_ptr", "labels_ptr", "words_ptr", "special_ptr")} |
                      dict(blocked_ptr="*i8"), dict(HAS_BLOCKED=True, HAS_WORDS=True, BLOCK=mm.gpu_block(512)),
                      4, 3, ("cols",)))
    block, warps = rm.gpu_tiles(196)
    specs.append(Spec("random_masking", "random_masking", "196 patches", rm._random_masking_kernel,
                      dict(keep_ptr="*i64", mask_ptr="*u8", restore_ptr="*i64"), dict(BLOCK=block), warps, 3))
    return specs


SPEC_SETS: dict[str, Callable[..., list[Spec]]] = {
    "attention": lambda arch, all_candidates: _attention_specs(all_candidates),
    "contrastive": _contrastive_specs,
    "contrastive_blas": lambda arch, all_candidates: _blas_chunk_specs(),
    "others": lambda arch, all_candidates: _small_kernel_specs(),
}


def specs(arch: int = 90, all_candidates: bool = False, ops=None) -> list[Spec]:
    out = []
    for name, make in SPEC_SETS.items():
        if ops is None or name in ops:
            out += make(arch, all_candidates)
    return out


def check(arch: int = 90, ops=None) -> list[Resources]:
    """Compile every kernel's default launch; returns those that failed to compile."""
    return [r for r in map(lambda s: compile_spec(s, arch), specs(arch, False, ops)) if r.error]


def per_exp(r: Resources) -> str:
    """Main-loop instructions per exp2, i.e. per score element a thread handles ("" without exp2)."""
    return f"{r.loop_instructions / r.loop_exps:.1f}" if r.loop_exps else ""


def table(rows: list[Resources]) -> str:
    lines = ["| op | kernel | case | config | registers | stack (spill) bytes | STL | shared KiB | wgmma "
             "| loop instructions | per exp2 |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.error:
            lines.append(f"| {r.op} | {r.kernel} | {r.case} | {r.config} | **failed: {r.error}** | | | | | | |")
            continue
        stack = f"**{r.local_bytes}**" if r.local_bytes else "0"
        lines.append(f"| {r.op} | {r.kernel} | {r.case} | {r.config} | {r.regs} | {stack} | {r.spill_stores} | "
                     f"{r.shared_bytes / 1024:.1f} | {r.wgmma} | {r.loop_instructions} | {per_exp(r)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastpt.bench.aot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100 / H200, sm_90a)")
    ap.add_argument("--all-candidates", action="store_true", help="every autotuning candidate, not the first")
    ap.add_argument("--ops", nargs="*", choices=sorted(SPEC_SETS), help="only these ops")
    ap.add_argument("--out", help="also write the table to this Markdown file")
    args = ap.parse_args(argv)
    why = available()
    if why is not None:
        print(f"cannot compile here: {why}", file=sys.stderr)
        return 2
    rows = []
    for spec in specs(args.arch, args.all_candidates, args.ops):
        r = compile_spec(spec, args.arch)
        rows.append(r)
        print(f"{r.op:12s} {r.kernel:6s} {r.case:24s} {r.config:60s} "
              + (f"FAILED {r.error}" if r.error else f"regs {r.regs:3d} stack {r.local_bytes:6d} "
                 f"STL {r.spill_stores:4d} shared {r.shared_bytes / 1024:6.1f} KiB wgmma {r.wgmma} "
                 f"loop {r.loop_instructions} "
                 f"per-exp {per_exp(r) or '-'}"), flush=True)
    text = table(rows)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"# Triton kernels compiled for sm_{args.arch} (no GPU: compile-time resources)\n\n{text}\n")
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
