"""Cross-check against NVIDIA Megatron-Bridge (GPU images only: it needs Python >= 3.12 and TE).

On CPU this module is skipped; the comparison machinery itself (crosscheck.compare_model_with_checkpoint)
is tested on CPU in test_convert_models.py against a model loaded with our own loader.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from test_convert_models import tiny_hf_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="Megatron-Bridge needs CUDA and Transformer Engine"
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("megatron.bridge") is None, reason="Megatron-Bridge is not installed"
    ),
]


def _crosscheck(root: str, arch: str) -> int:
    from checkpoints_tools.convert import hf_to_megatron
    from checkpoints_tools.crosscheck import main

    root = Path(root)
    tiny_hf_model(arch, dtype=torch.bfloat16).save_pretrained(root / "hf")
    hf_to_megatron(root / "hf", root / "mg", progress=False)  # naming "auto": TE keys where TE imports
    return main(["--hf", str(root / "hf"), "--megatron", str(root / "mg")])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "qwen3_moe", "deepseek_v3"])
def test_our_checkpoint_equals_megatron_bridge(tmp_path, arch):
    from megatron_opd.runtime.spawn import spawn_world

    assert spawn_world(_crosscheck, 1, (str(tmp_path), arch), timeout_s=600)[0] == 0
