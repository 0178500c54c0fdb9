"""A Hugging Face directory loaded in memory into a megatron model under TP (models/hf/load.py).

transformers writes tiny random models; a world of two ranks builds each under TP=2 from the
ModelConfig that `open_hf_model` translates, loads `rank_state_dict` on each rank and checks
(a) the logits against transformers' own forward (fp32, eager attention) and (b) that the two
ranks' shards, gathered back (models/full_weights.py) and named the HF way (live.py), are the
HF file's tensors bit for bit. A world of one rank does the same at TP=1 for an MoE model (MoE
under TP > 1 cannot be built on CPU) and names a missing tensor.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import pytest
import torch

from test_convert_models import TOKENS, hf_logits, read_safetensors_dir, tiny_hf_model

TP2_ARCHS = ("llama", "qwen2", "qwen3", "deepseek_v3_dense")
TP1_ARCHS = ("qwen3_moe",)


def _load(hf_dir: Path, layout, tp_rank: int, tp_size: int) -> dict:
    """Rank's view: logits (gathered over TP), the shards gathered back under HF names, load report."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_opd.models.full_weights import full_state_dict
    from megatron_opd.models.gpt import build_gpt_model
    from megatron_opd.models.hf.live import hf_from_megatron
    from megatron_opd.models.hf.load import open_hf_model, rank_state_dict

    hf = open_hf_model(hf_dir)
    net = build_gpt_model(hf.cfg, layout)
    state = rank_state_dict(hf, net, tp_rank=tp_rank, tp_size=tp_size)
    shapes_fit = all(state[n].shape == p.shape for n, p in net.named_parameters())
    missing, unexpected = net.load_state_dict(state, strict=False)
    net.eval()
    ids = torch.tensor(TOKENS)
    with torch.no_grad():
        logits = net(ids, torch.arange(ids.shape[1]).expand_as(ids), None)
        logits = gather_from_tensor_model_parallel_region(logits)[..., : hf.cfg.vocab_size].float()
        group = parallel_state.get_tensor_model_parallel_group() if dist.get_world_size() > 1 else None
        back = hf_from_megatron(hf.cfg, full_state_dict(net, group))
    return {
        "logits": logits,
        "hf_back": back,
        "shapes_fit": shapes_fit,
        "missing": [k for k in missing if not k.endswith("_extra_state")],
        "unexpected": list(unexpected),
    }


def _tp2_world(root: str) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state

    from megatron_opd.runtime.distributed import init_runtime
    from megatron_opd.runtime.layout import ParallelLayout

    layout = init_runtime(ParallelLayout(tp=2), seed=0)
    rank = parallel_state.get_tensor_model_parallel_rank()
    out = {arch: _load(Path(root) / arch, layout, rank, 2) for arch in TP2_ARCHS}
    return out if rank == 0 else {}


def _tp1_world(root: str) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    from safetensors.torch import load_file, save_file

    from megatron_opd.models.gpt import build_gpt_model
    from megatron_opd.models.hf.errors import MissingTensors
    from megatron_opd.models.hf.load import open_hf_model, rank_state_dict
    from megatron_opd.runtime.distributed import init_runtime
    from megatron_opd.runtime.layout import ParallelLayout

    layout = init_runtime(ParallelLayout(), seed=0)
    out = {arch: _load(Path(root) / arch, layout, 0, 1) for arch in TP1_ARCHS}
    lacking = Path(root) / "lacking"
    shutil.copytree(Path(root) / "qwen3", lacking)
    (file,) = lacking.glob("*.safetensors")
    tensors = load_file(str(file))
    tensors.pop("model.layers.1.self_attn.k_proj.weight")
    save_file(tensors, str(file))
    hf = open_hf_model(lacking)
    try:
        rank_state_dict(hf, build_gpt_model(hf.cfg, layout), tp_rank=0, tp_size=1)
        out["missing_message"] = "no error"
    except MissingTensors as e:
        out["missing_message"] = str(e)
    return out


@functools.lru_cache(maxsize=1)
def _results(root: str) -> tuple[Path, dict, dict]:
    from megatron_opd.runtime.spawn import spawn_world

    reference = {}
    for arch in TP2_ARCHS + TP1_ARCHS:
        model = tiny_hf_model(arch)
        model.save_pretrained(Path(root) / arch)
        reference[arch] = hf_logits(model, TOKENS)
    loaded = spawn_world(_tp2_world, 2, (root,), timeout_s=300)[0]
    loaded.update(spawn_world(_tp1_world, 1, (root,), timeout_s=300)[0])
    return Path(root), reference, loaded


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return _results(str(tmp_path_factory.mktemp("hf_load")))


@pytest.mark.parametrize("arch", TP2_ARCHS + TP1_ARCHS)
def test_logits_match_transformers(results, arch):
    _, reference, loaded = results
    r = loaded[arch]
    assert r["shapes_fit"] and r["missing"] == [] and r["unexpected"] == []
    assert (r["logits"] - reference[arch]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", TP2_ARCHS + TP1_ARCHS)
def test_rank_shards_gather_back_to_the_hf_tensors_bit_for_bit(results, arch):
    root, _, loaded = results
    files = read_safetensors_dir(root / arch)
    back = loaded[arch]["hf_back"]
    if "lm_head.weight" in files and "lm_head.weight" not in back:  # tied embeddings
        files.pop("lm_head.weight")
    assert sorted(back) == sorted(files)
    assert all(back[k].dtype == files[k].dtype and torch.equal(back[k], files[k]) for k in files)


def test_a_missing_tensor_is_named(results):
    _, _, loaded = results
    msg = loaded["missing_message"]
    assert "model.layers.1.self_attn.k_proj.weight" in msg and "lacking" in msg, msg
