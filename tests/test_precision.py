"""The precision a run computes in, chosen once (mnist_gauss.precision; the other training scripts
hold the same lines): forced by --amp / --no-amp, else bfloat16 only where it runs natively."""
import json

import pytest
import torch

import mnist_gauss

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("mps")


@pytest.fixture
def machine(monkeypatch):
    """Stub the CPU's bfloat16 units, the kernels torch runs and the GPU's bfloat16 support."""
    def stub(amx=False, avx512_bf16=False, kernels="AVX512", gpu_bf16=True):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: kernels)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: gpu_bf16)
    return stub


@pytest.mark.parametrize("device,units,amp,dtype,why", [
    (CPU, dict(amx=True), None, torch.bfloat16, "native"),
    (CPU, dict(avx512_bf16=True, kernels="AMX"), None, torch.bfloat16, "native"),
    (CPU, dict(), None, torch.float32, "no native bfloat16"),  # AVX-512 without BF16, AVX2
    (CPU, dict(amx=True, kernels="AVX2"), None, torch.float32, "AVX2"),  # ATEN_CPU_CAPABILITY
    (CPU, dict(), True, torch.bfloat16, "--amp"),
    (CPU, dict(amx=True), False, torch.float32, "--no-amp"),
    (CUDA, dict(), None, torch.bfloat16, "CUDA"),
    (CUDA, dict(gpu_bf16=False), None, torch.float16, "float16"),  # with a gradient scaler
    (CUDA, dict(gpu_bf16=False), True, torch.float16, "--amp"),
    (MPS, dict(amx=True), None, torch.float32, "--amp"),
])
def test_precision_follows_the_flags_and_the_machine(machine, device, units, amp, dtype, why):
    machine(**units)
    chosen, reason = mnist_gauss.precision(device, amp)
    assert chosen == dtype and why in reason


def test_a_run_prints_and_records_its_precision(machine, run_script, tmp_path, capsys):
    machine(kernels="AVX2")
    metrics = run_script(mnist_gauss, tmp_path / "run", "--steps", "2", "--sigma", "0.5")
    first = capsys.readouterr().out.splitlines()[0]
    assert first == "float32: this CPU has no native bfloat16 (no AVX-512 BF16, no AMX)"
    assert metrics["precision"] == {"dtype": "float32", "why": first.split(": ", 1)[1]}
    assert metrics["segments"] == [[0, "cpu", "float32"]]
    assert json.loads((tmp_path / "run" / "args.json").read_text())["amp"] is None  # auto
