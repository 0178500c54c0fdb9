"""Config errors name the key, the closest valid key, or the numbers that do not divide."""

from __future__ import annotations

import pytest

from megatron_opd.config import ConfigError, JobConfig, load_config, to_dict, build
from megatron_opd.models.config import ModelConfig
from megatron_opd.runtime.layout import LayoutError, ParallelLayout


def test_yaml_and_overrides_build_typed_tree(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stage: sft\ntrain:\n  steps: 7\n  optim:\n    lr: 1.0e-3\nparallel:\n  tp: 2\n")
    cfg = load_config(path, ["train.optim.lr=3e-4", "model.moe_layer_freq=[0,1]", "run.name=x"])
    assert isinstance(cfg, JobConfig)
    assert cfg.train.steps == 7 and cfg.train.optim.lr == pytest.approx(3e-4)
    assert cfg.parallel == ParallelLayout(tp=2)
    assert cfg.model.moe_layer_freq == [0, 1]
    assert build(JobConfig, to_dict(cfg)) == cfg  # a dumped config loads back unchanged


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.optim.lrr=1", "unknown config key 'train.optim.lrr'; did you mean 'train.optim.lr'?"),
        ("trian.steps=3", "unknown config key 'trian'; did you mean 'train'?"),
        ("model.num_layres=2", "did you mean 'model.num_layers'?"),
        ("train.steps=abc", "train.steps: expected an integer, got str 'abc'"),
        ("parallel.tp=1.5", "parallel.tp: expected an integer, got float 1.5"),
        ("model.tie_embeddings=1", "model.tie_embeddings: expected true or false"),
        ("stage=sfft", "stage: 'sfft' is not one of ['sft', 'opd', 'grpo']; did you mean 'sft'?"),
        ("train.optim.lr", "is not of the form a.b.c=value"),
        ("train.steps.x=1", "train.steps is a value, not a section"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_unknown_key_in_yaml_names_closest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  micro_batch: 4\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.micro_batch'; did you mean 'train.micro_batch_size'"):
        load_config(path)


def test_layout_not_dividing_world_names_numbers():
    with pytest.raises(LayoutError, match=r"world size 6 is not divisible by tp\*pp\*cp = 4\*1\*1 = 4"):
        ParallelLayout(tp=4).resolve(6)
    with pytest.raises(LayoutError, match=r"parallel.dp=3 but world size 8 / \(tp\*pp\*cp = 2\) = 4"):
        ParallelLayout(tp=2, dp=3).resolve(8)
    with pytest.raises(LayoutError, match=r"parallel.ep=4 does not divide the data\*context parallel size dp\*cp = 2\*1 = 2"):
        ParallelLayout(tp=2, ep=4).resolve(4)
    assert ParallelLayout(tp=2, pp=2).resolve(8).dp == 2


def test_layout_checks_the_model():
    model = ModelConfig(num_attention_heads=6, num_query_groups=3, num_layers=4)
    with pytest.raises(LayoutError, match="model.num_attention_heads=6 is not divisible by parallel.tp=4"):
        model.check(ParallelLayout(tp=4, dp=1))
    with pytest.raises(LayoutError, match="model.num_layers=4 is not divisible by parallel.pp=3"):
        model.check(ParallelLayout(pp=3, dp=1))
    moe = ModelConfig(num_experts=6)
    with pytest.raises(LayoutError, match="model.num_experts=6 is not divisible by parallel.ep=4"):
        moe.check(ParallelLayout(ep=4, dp=4))
    with pytest.raises(LayoutError, match="need parallel.sequence_parallel=true"):
        moe.check(ParallelLayout(tp=2, dp=1))
    with pytest.raises(LayoutError, match="parallel.ep=2 needs a MoE model"):
        ModelConfig().check(ParallelLayout(ep=2, dp=2))
