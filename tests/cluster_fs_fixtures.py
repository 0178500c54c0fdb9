"""A cluster's file system for the example configs under configs/cluster/, and what a config needs
that this checkout may not have yet.

A cluster config names paths on the cluster's file system (/lustre/...), which a login node sees
and this machine does not. `on_cluster_fs` gives it one: /lustre is mapped into a temporary
directory, where every prompt file the config names exists (one row), and every Hugging Face
model directory it names holds the config.json of the model it is (REAL_CONFIG_JSON, the
published file; a directory not listed there stays unseen, as from a login node that does not
mount it). So the checks that read files run for real (tests/test_config.py
test_shipped_config_passes_its_check, tests/test_slurm_render.py): a `model:` section that does
not describe its train.init_from's config.json, or a missing dataset, fails.

    path = on_cluster_fs(REPO / "configs/cluster/x.yaml", tmp_path)   # the config, remapped
    reason = missing_features(REPO / "configs/cluster/x.yaml")         # None, or what is missing
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER_ROOT = "/lustre/"

# The config.json of Qwen/Qwen3-8B as published (the model every real-size config here starts from).
QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 12288,
    "max_position_embeddings": 40960, "max_window_layers": 36, "model_type": "qwen3",
    "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936,
}  # fmt: skip
# Model directory name (under the cluster root) -> its config.json: the base and what is trained from it.
REAL_CONFIG_JSON = {
    "Qwen3-8B": QWEN3_8B,
    "qwen3-8b-math-expert": QWEN3_8B,
    "qwen3-8b-code-expert": QWEN3_8B,
}
DATASET_ROW = {
    "math": {"prompt": "What is 1 + 1? Put the answer in \\boxed{}.", "answer": "2"},
    "code": {"prompt": "Write f(x) returning x + 1.", "tests": "assert f(1) == 2"},
}


def _model_dirs(tree: dict) -> list[str]:
    dirs = [tree.get("train", {}).get("init_from", "")]
    dirs += [t.get("model_dir", "") for t in (tree.get("teachers") or {}).values()]
    cluster = tree.get("cluster") or {}
    dirs += [p.get("model_path", "") for p in (cluster.get("teachers") or {}).values()]
    dirs.append((cluster.get("rollout") or {}).get("model_path", ""))
    return [d for d in dirs if d.startswith(CLUSTER_ROOT)]


def on_cluster_fs(config: Path, root: Path) -> Path:
    """`config` with /lustre mapped to `root`, and the files it reads made there."""
    text = config.read_text()
    tree = yaml.safe_load(text)
    for d in _model_dirs(tree):
        name = Path(d).name
        if name not in REAL_CONFIG_JSON:  # unseen, as from a login node that does not mount it
            continue
        target = root / Path(d).relative_to(CLUSTER_ROOT)
        target.mkdir(parents=True, exist_ok=True)
        (target / "config.json").write_text(json.dumps(REAL_CONFIG_JSON[name]))
    for dataset in (tree.get("data") or {}).get("datasets", []):
        target = root / Path(dataset["path"]).relative_to(CLUSTER_ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(DATASET_ROW[dataset["domain"]]) + "\n")
    out = root / "configs" / config.name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text.replace(CLUSTER_ROOT, f"{root}/"))
    return out


def missing_features(config: Path) -> str | None:
    """What `config` uses that this checkout does not implement yet (None: nothing): a stage not
    registered, or prompt files (data.datasets) before the data sources that read them."""
    import dataclasses

    from megatron_opd.config import DataConfig
    from megatron_opd.config.stages import implemented

    tree = yaml.safe_load(config.read_text()) or {}
    stage = tree.get("stage", "opd")
    if stage not in implemented():
        return f"stage {stage!r} is not implemented in this checkout"
    if "datasets" in (tree.get("data") or {}) and "datasets" not in {f.name for f in dataclasses.fields(DataConfig)}:
        return "data.datasets (prompt files) is not in this checkout"
    return None
