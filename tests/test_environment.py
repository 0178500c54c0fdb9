"""The CPU environment is what the project promises: no Transformer Engine, no PyPI `apex`."""

from __future__ import annotations

import importlib.util

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU machines may carry Transformer Engine")
def test_no_gpu_only_packages_on_cpu():
    # Any installed transformer-engine breaks `import megatron.core` without CUDA, and the PyPI
    # `apex` is an unrelated web toolkit that megatron-core would mistake for NVIDIA Apex.
    for name in ("transformer_engine", "apex"):
        assert importlib.util.find_spec(name) is None, f"{name} must not be installed on a CPU machine"


def test_megatron_core_version_in_declared_range():
    from importlib.metadata import version

    from packaging.version import Version

    v = Version(version("megatron-core"))
    assert Version("0.16.1") <= v < Version("0.20"), v
