"""Run configuration: dataclass defaults in one place, YAML presets and overrides on top.

The defaults are the paper's CIFAR-10 / ViT-Tiny pre-training setting (SPEC section 5),
in :mod:`~dsmae.config.sections`. Every command's configuration is built by one
function, :func:`build_config`, in layers, each a nested mapping merged onto the one
before: defaults <- a checkpoint's saved config (for the commands that evaluate one) <-
preset (``src/dsmae/presets/NAME.yaml``, only what differs from the defaults) <- the
user's YAML files <- command-line overrides (``--set train.epochs=100`` and the common
flags). Unknown keys and impossible values are refused with a :class:`ConfigError` naming
the key, before anything is built: each section's ``validate`` sits beside its fields,
and every closed set of values is a ``Literal`` of :mod:`~dsmae.config.choices`. The
resolved configuration (every ``None`` filled in) is saved with every run and inside
every checkpoint; the fields marked :data:`RESUMABLE` may differ when a run resumes.

Parts: ``choices`` (the values a key may take), ``checks`` (:class:`ConfigError` and the
refusals), ``sections`` (the dataclasses), ``yaml_files`` (presets, files, ``--set``),
``parsing`` (a Config from a mapping), ``builder`` (the layers and derived values) and
``resolution`` (derived defaults filled in, then validated).
"""

from dsmae.config.builder import build_config, flat_config, model_config
from dsmae.config.checks import ConfigError, check_pool_argument
from dsmae.config.choices import (
    ARCHS,
    ATTENTION_KERNELS,
    COMPILE_MODES,
    COMPILE_SCOPES,
    DEFAULT_NOISE_RATIO,
    DSMAE_METHODS,
    EMA_EVERY,
    METHOD_TRAITS,
    METHODS,
    METHODS_WITH_TEACHER,
    NOISE_MODES,
    POOLS,
    PROBE_RECIPES,
    TARGET_NORMS,
    TEACHER_INPUTS,
    Arch,
    AttentionKernel,
    CompileMode,
    CompileScope,
    DsmaeMethod,
    EmaEvery,
    Method,
    MethodTraits,
    NoiseMode,
    Pool,
    ProbeRecipe,
    TargetNorm,
    TeacherInput,
)
from dsmae.config.parsing import config_from_dict, typed_value
from dsmae.config.resolution import (
    fill_data_stats,
    resolve,
    resolve_model,
    validate,
    world_size_from_env,
)
from dsmae.config.sections import (
    DEVICE_PATTERN,
    RESUMABLE,
    WANDB_FORBIDDEN,
    Config,
    DataConfig,
    FinetuneConfig,
    LogConfig,
    ModelConfig,
    MonitorConfig,
    ProbeConfig,
    TrainConfig,
    resumable,
    resumable_keys,
)
from dsmae.config.yaml_files import available_presets, parse_assignment, read_preset, read_yaml

__all__ = [
    "ARCHS",
    "ATTENTION_KERNELS",
    "COMPILE_MODES",
    "COMPILE_SCOPES",
    "DEFAULT_NOISE_RATIO",
    "DEVICE_PATTERN",
    "DSMAE_METHODS",
    "EMA_EVERY",
    "METHODS",
    "METHODS_WITH_TEACHER",
    "METHOD_TRAITS",
    "NOISE_MODES",
    "POOLS",
    "PROBE_RECIPES",
    "RESUMABLE",
    "TARGET_NORMS",
    "TEACHER_INPUTS",
    "WANDB_FORBIDDEN",
    "Arch",
    "AttentionKernel",
    "CompileMode",
    "CompileScope",
    "Config",
    "ConfigError",
    "DataConfig",
    "DsmaeMethod",
    "EmaEvery",
    "FinetuneConfig",
    "LogConfig",
    "Method",
    "MethodTraits",
    "ModelConfig",
    "MonitorConfig",
    "NoiseMode",
    "Pool",
    "ProbeConfig",
    "ProbeRecipe",
    "TargetNorm",
    "TeacherInput",
    "TrainConfig",
    "available_presets",
    "build_config",
    "check_pool_argument",
    "config_from_dict",
    "fill_data_stats",
    "flat_config",
    "model_config",
    "parse_assignment",
    "read_preset",
    "read_yaml",
    "resolve",
    "resolve_model",
    "resumable",
    "resumable_keys",
    "typed_value",
    "validate",
    "world_size_from_env",
]
