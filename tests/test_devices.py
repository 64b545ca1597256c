"""Training and the commands resolve a device name the same way (cpl_fast.devices)."""
from __future__ import annotations

import pytest
import torch

from cpl_fast.cli.common import torch_device
from cpl_fast.config import ConfigError
from cpl_fast.devices import resolve_device
from cpl_fast.train.distributed import DistInfo
from cpl_fast.train.distributed import resolve_device as trainer_device


def test_auto_and_cpu():
    expected = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    assert resolve_device("auto") == torch_device("auto") == expected
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_refused_by_name():
    with pytest.raises(ValueError, match="device 'cuda:1': CUDA is not available"):
        resolve_device("cuda:1")
    with pytest.raises(ValueError, match="device 'cuda'"):
        torch_device("cuda")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        trainer_device("cuda", DistInfo())
