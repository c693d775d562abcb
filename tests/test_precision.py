"""The default precision follows the CPU's bfloat16 support (common.cpu_bf16 / precision)."""
import json

import pytest
import torch

import common
import mnist_gauss

CPU = torch.device("cpu")


def matmul_dtype(amp=None):
    """The dtype a matmul computes in under common.autocast(CPU, amp)."""
    with common.autocast(CPU, amp):
        return (torch.ones(2, 2) @ torch.ones(2, 2)).dtype


@pytest.fixture
def cpu_flags(monkeypatch):
    """Stub the CPU's capability flags and ISA caps; cpu_bf16's cache is cleared around it."""
    def stub(amx=False, avx512_bf16=False, capability="AVX512", machine="x86_64", onednn=None):
        common.cpu_bf16.cache_clear()
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        monkeypatch.setattr(common.platform, "machine", lambda: machine)
        monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
        if onednn is None:
            monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        else:
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", onednn)
    yield stub
    common.cpu_bf16.cache_clear()


@pytest.mark.parametrize("flags, dtype, reason", [
    (dict(amx=True, avx512_bf16=True), torch.bfloat16, "AMX"),
    (dict(avx512_bf16=True), torch.bfloat16, "AVX-512 BF16"),
    (dict(capability="AVX2"), torch.float32, "no native bfloat16"),
    (dict(), torch.float32, "no native bfloat16"),  # AVX-512 without BF16 (Skylake, Ice Lake)
    (dict(avx512_bf16=True, capability="AVX2"), torch.float32, "AVX2 kernels"),
    (dict(amx=True, onednn="AVX2"), torch.float32, "ONEDNN_MAX_CPU_ISA=AVX2"),
    (dict(amx=True, onednn="avx512_core_amx"), torch.bfloat16, "AMX"),
    (dict(machine="aarch64"), torch.float32, "only on x86"),
])
def test_auto_precision_follows_the_cpu(cpu_flags, flags, dtype, reason):
    cpu_flags(**flags)
    chosen, why = common.precision(CPU)
    assert chosen == dtype and reason in why
    assert matmul_dtype() == dtype


def test_amp_flags_override_the_detection(cpu_flags):
    cpu_flags(capability="AVX2")
    assert common.precision(CPU, True)[0] == torch.bfloat16
    assert matmul_dtype(True) == torch.bfloat16
    cpu_flags(amx=True)
    assert common.precision(CPU, False) == (torch.float32, "--no-amp")
    assert matmul_dtype(False) == torch.float32
    assert not common.grad_scaler(CPU, True).is_enabled()  # only float16 needs a scaler


def test_run_names_and_records_its_precision(cpu_flags, run_script, tmp_path, capsys):
    cpu_flags(capability="AVX2")
    metrics = run_script(mnist_gauss, tmp_path / "run", "--steps", "2", "--sigma", "0.5")
    assert capsys.readouterr().out.startswith("float32: this CPU has no native bfloat16")
    assert metrics["precision"] == {"dtype": "float32",
                                    "why": "this CPU has no native bfloat16 (no AVX-512 BF16, "
                                           "no AMX)"}
    assert json.loads((tmp_path / "run" / "args.json").read_text())["amp"] is None  # auto
