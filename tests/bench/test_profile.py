"""fastpt.bench.profile: the e2e pairs under torch.profiler (the GPU check's "why" file)."""
import pytest

from fastpt.bench import profile


@pytest.mark.parametrize("name,cls", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
    ("nvjet_tst_128x192_64x4_1x2_h_bz_coopA_NNT", "matmul"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm>", "matmul"),
    ("flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4>>", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "attention"),
    ("_attn_fwd", "attention"),
    ("_ce_chunk_kernel", "fastpt triton"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", "elementwise"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16>", "reduction"),
    ("Memcpy DtoD (Device -> Device)", "copy / cast"),
    ("something_else", "other"),
])
def test_kernel_classes(name, cls):
    assert profile.kernel_class(name) == cls


def test_cpu_report_names_every_side_and_its_operators(tmp_path, capsys):
    out = tmp_path / "profile.txt"
    assert profile.main(["--device", "cpu", "--quick", "--models", "bert", "--steps", "1", "--out", str(out)]) == 0
    text = out.read_text()
    for side in ("fastpt", "transformers"):
        assert f"B8 S64 {side}" in text
    assert text.count("wall ") == 2 and "aten::" in text
    assert "profile bert-tiny B8 S64 fastpt" in capsys.readouterr().err


def test_bad_arguments_are_named():
    with pytest.raises(SystemExit):
        profile.main(["--device", "cpu", "--models", "bert,t5"])
    with pytest.raises(SystemExit):
        profile.main(["--device", "cpu", "--steps", "0"])


def test_compiled_case_is_profiled(tmp_path, monkeypatch):
    """--compile profiles the pairs' torch.compile case: the header and each side's note say so.
    Compiled with ``aot_eager`` here (graphs without Inductor's code generation: seconds)."""
    import torch

    real_compile = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self: real_compile(self, backend="aot_eager"))
    out = tmp_path / "profile.txt"
    argv = ["--device", "cpu", "--quick", "--models", "bert", "--steps", "1", "--compile", "--out", str(out)]
    assert profile.main(argv) == 0
    text = out.read_text()
    assert text.splitlines()[0].endswith(", torch.compile")
    assert "torch.compile: model.backbone (" in text  # fastpt: its backbone, as train.compile does
    assert "torch.compile: model (" in text  # transformers: the whole model


def test_a_run_cut_short_keeps_the_sides_done(tmp_path, monkeypatch):
    """--out is rewritten after every side: the GPU check's time limit cut the profile after one side and
    left no file at all (it was written once, at the end)."""
    out = tmp_path / "profile.txt"
    real = profile.profile_step
    calls = []

    def second_side_interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what SIGINT from `timeout --signal=INT` raises
        return real(*args, **kwargs)

    monkeypatch.setattr(profile, "profile_step", second_side_interrupted)
    with pytest.raises(KeyboardInterrupt):
        profile.main(["--device", "cpu", "--quick", "--models", "bert", "--steps", "1", "--out", str(out)])
    text = out.read_text()
    assert text.count("wall ") == 1 and "B8 S64 fastpt" in text
