"""One typed config tree for every job: dataclasses, loaded from YAML, with `a.b.c=value` overrides.

Torch-free and megatron-free, so a SLURM login node loads, checks and renders a job:

    typed.py     build / to_dict / set_path: keys and types checked against the dataclasses
    loading.py   load_config (YAML + overrides), derive, dump_config
    job.py       JobConfig and the loop's sections; JobConfig.check(), every rank-free check
    stages.py    the stage registry: name -> "module:Class" and the stage's own config check

An unknown or misspelled key is an error that names the closest valid key, every value is
checked against its field's type, and `JobConfig.check()` refuses what cannot run before any
rank starts, so a typo never silently falls back to a default or fails deep inside a stage.
"""

from megatron_opd.config.job import (
    DataConfig,
    GRMConfig,
    GRPOConfig,
    DatasetConfig,
    JobConfig,
    OPDConfig,
    OptimConfig,
    PipelineConfig,
    RecipeConfig,
    RunConfig,
    TrainConfig,
)
from megatron_opd.config.loading import derive, dump_config, load_config, read_yaml
from megatron_opd.config.stages import STAGES, StageSpec, stage_spec
from megatron_opd.config.typed import ConfigError, build, parse_override, set_path, to_dict

__all__ = [
    "ConfigError",
    "DataConfig",
    "GRMConfig",
    "GRPOConfig",
    "DatasetConfig",
    "JobConfig",
    "OPDConfig",
    "OptimConfig",
    "PipelineConfig",
    "RecipeConfig",
    "RunConfig",
    "STAGES",
    "StageSpec",
    "TrainConfig",
    "build",
    "derive",
    "dump_config",
    "load_config",
    "parse_override",
    "read_yaml",
    "set_path",
    "stage_spec",
    "to_dict",
]
