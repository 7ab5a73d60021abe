"""rftlab.runtime on CPU: device, precision and compile selection, with CUDA faked where the logic depends on it."""

from __future__ import annotations

import contextlib

import pytest
import torch

from rftlab import runtime
from rftlab.errors import RftlabError


@pytest.fixture()
def fake_cuda(monkeypatch: pytest.MonkeyPatch):
    """``fake_cuda(available, native_bf16)``: make torch report a CUDA device with or without native bf16."""

    def fake(available: bool, native_bf16: bool = True) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True: available and (native_bf16 or including_emulation))

    return fake


def test_auto_device_follows_cuda_availability(fake_cuda) -> None:
    fake_cuda(False)
    assert runtime.resolve_device("auto") == "cpu"
    fake_cuda(True)
    assert runtime.resolve_device("auto") == "cuda"
    assert runtime.resolve_device("cuda:1") == "cuda:1"
    assert runtime.resolve_device("cpu") == "cpu"


def test_cuda_without_a_device_and_unknown_devices_are_user_errors(fake_cuda) -> None:
    fake_cuda(False)
    with pytest.raises(RftlabError, match="sees no CUDA device"):
        runtime.resolve_device("cuda")
    with pytest.raises(RftlabError, match="unknown device"):
        runtime.resolve_device("tpu")


def test_auto_precision_is_bf16_only_on_cuda_with_native_bf16(fake_cuda) -> None:
    fake_cuda(True, native_bf16=True)
    assert runtime.select_precision("auto", "cuda") == "bf16"
    assert runtime.select_precision("auto", "cuda:0") == "bf16"
    assert runtime.select_precision("auto", "cpu") == "fp32"  # CPUs mostly emulate bf16
    fake_cuda(True, native_bf16=False)  # e.g. a V100 or T4: bf16 only emulated
    assert runtime.select_precision("auto", "cuda") == "fp32"
    fake_cuda(False)
    assert runtime.select_precision("auto", "cpu") == "fp32"


def test_explicit_precisions(fake_cuda) -> None:
    fake_cuda(True, native_bf16=False)
    assert runtime.select_precision("fp32", "cuda") == "fp32"
    with pytest.raises(RftlabError, match="no native bf16"):
        runtime.select_precision("bf16", "cuda")
    assert runtime.select_precision("bf16", "cpu") == "bf16"  # CPU autocast, allowed for testing
    with pytest.raises(RftlabError, match="unknown precision 'fp16'"):
        runtime.select_precision("fp16", "cpu")


def test_autocast_only_for_bf16() -> None:
    assert isinstance(runtime.autocast("cuda", "fp32"), contextlib.nullcontext)
    ctx = runtime.autocast("cuda", "bf16")
    assert isinstance(ctx, torch.autocast) and ctx.device == "cuda" and ctx.fast_dtype == torch.bfloat16
    with runtime.autocast("cpu", "bf16"):  # CPU autocast runs here: matmuls come out in bf16
        out = torch.nn.Linear(4, 3)(torch.randn(2, 4))
    assert out.dtype == torch.bfloat16
    with runtime.autocast("cpu", "fp32"):
        assert torch.nn.Linear(4, 3)(torch.randn(2, 4)).dtype == torch.float32


def test_compile_is_off_by_default_and_in_place_when_on() -> None:
    model = torch.nn.Linear(4, 3)
    keys = list(model.state_dict())
    assert runtime.maybe_compile(model, False) is model and model._compiled_call_impl is None
    assert runtime.maybe_compile(model, True) is model  # same object, class and state-dict keys
    assert model._compiled_call_impl is not None and isinstance(model, torch.nn.Linear)
    assert list(model.state_dict()) == keys
