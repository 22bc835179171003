"""``--device auto`` / ``--dtype auto`` (models/devices.py): the rules, on a machine without a GPU.

The machines described by ``Accelerators`` values stand in for torch's availability
functions (the one seam, ``Accelerators.detect``); this machine's own answer is checked
against torch too. CUDA exactness is run where a GPU is (not in this suite).
"""

from __future__ import annotations

import argparse

import pytest
import torch

from biopetals.models.devices import Accelerators, DeviceError, choose_device, choose_dtype, describe
from biopetals.node.cli import build_parser, resolve_device

CPU = Accelerators()
H100 = Accelerators(cuda_bf16=(True, True), cuda_names=("NVIDIA H100", "NVIDIA H100"))
T4 = Accelerators(cuda_bf16=(False,), cuda_names=("Tesla T4",))
MAC = Accelerators(mps=True)


@pytest.mark.parametrize("acc, device, dtype", [
    (CPU, "cpu", "float32"), (H100, "cuda:0", "bfloat16"), (T4, "cuda:0", "float16"), (MAC, "mps", "float16"),
])
def test_auto_picks_cuda_then_mps_then_cpu_and_the_dtype_per_device(acc, device, dtype):
    assert choose_device("auto", acc) == device
    assert choose_dtype("auto", device, acc) == dtype


def test_explicit_choices_are_kept_and_checked():
    assert choose_device("cuda:1", H100) == "cuda:1"
    assert choose_device("cuda", H100) == "cuda:0"
    assert choose_device("cpu", H100) == "cpu" and choose_dtype("auto", "cpu", H100) == "float32"
    assert choose_dtype("float32", "cuda:0", H100) == "float32"
    with pytest.raises(DeviceError, match="only 2 CUDA GPU"):
        choose_device("cuda:2", H100)
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        choose_device("cuda", CPU)
    with pytest.raises(DeviceError, match="no Apple MPS"):
        choose_device("mps", CPU)
    with pytest.raises(DeviceError, match="expected auto"):
        choose_device("tpu", H100)
    with pytest.raises(DeviceError, match="cuda:N"):
        choose_device("cuda:x", H100)
    with pytest.raises(DeviceError, match="does not support bf16"):
        choose_dtype("bfloat16", "cuda:0", T4)


def test_the_start_line_names_device_and_dtype():
    assert describe("cuda:1", "bfloat16", H100) == "device cuda:1 (NVIDIA H100), bfloat16"
    assert describe("cpu", "float32", CPU) == "device cpu, float32"


def test_node_defaults_to_auto_and_resolves_on_this_machine():
    args = build_parser().parse_args(["--model", "m", "--swarm-key", "k", "--new-swarm"])
    assert (args.device, args.dtype) == ("auto", "auto")
    line = resolve_device(args, H100)
    assert (args.device, args.dtype) == ("cuda:0", "bfloat16") and "cuda:0" in line
    here = Accelerators.detect()
    assert here.cuda_count == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    args = argparse.Namespace(device="auto", dtype="auto")
    resolve_device(args)
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert (args.device, args.dtype) == ("cpu", "float32")
