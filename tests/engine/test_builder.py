"""Start-up choices: the batch cap the device gets when the config leaves it open."""

from __future__ import annotations

import pytest
import torch

from app.engine.builder import default_max_batch_size
from app.engine.config import EngineConfig


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", 512),
        ("NVIDIA H200", 512),
        ("NVIDIA A100-SXM4-80GB", 256),
        ("NVIDIA GeForce RTX 4090", 128),
        ("NVIDIA RTX A1000 Laptop GPU", 128),  # a word of the name, not a substring
    ],
)
def test_batch_cap_by_gpu_name(monkeypatch: pytest.MonkeyPatch, name: str, expected: int) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert default_max_batch_size(torch.device("cuda")) == expected


def test_batch_cap_on_the_cpu() -> None:
    assert default_max_batch_size(torch.device("cpu")) == 128


def test_negative_batch_cap_is_refused() -> None:
    assert EngineConfig().max_batch_size == 0  # chosen at start-up
    with pytest.raises(ValueError, match="max_batch_size must be >= 0"):
        EngineConfig(max_batch_size=-1)
