"""Typed, validated configs: tasks (tasks/*.yaml), pipelines (pipelines/*.yaml) and studies.

Every YAML file is parsed here and nowhere else; everything above this package receives typed
configs. Import from this package, not its modules.
"""

from allinone.config.loaded import Pipeline, load_pipeline, task_file
from allinone.config.loading import (
    SKIMAGE_SOURCE,
    ConfigError,
    expand_env,
    load_yaml,
    resolve_source,
    validate,
)
from allinone.config.pipeline import (
    DEFAULT_MAX_PIXELS,
    AshaSection,
    CurriculumSection,
    DataSection,
    EvalSection,
    FewShotSection,
    ModelSection,
    PipelineConfig,
    SearchDomain,
    TrainSection,
    TuneSection,
    check_model,
)
from allinone.config.study import apply_values, max_curriculum_steps, validation_metric_names
from allinone.config.task import (
    BenchmarkSet,
    MemberFormat,
    SplitConfig,
    TaskConfig,
    load_task,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "SKIMAGE_SOURCE",
    "AshaSection",
    "BenchmarkSet",
    "ConfigError",
    "CurriculumSection",
    "DataSection",
    "EvalSection",
    "FewShotSection",
    "MemberFormat",
    "ModelSection",
    "Pipeline",
    "PipelineConfig",
    "SearchDomain",
    "SplitConfig",
    "TaskConfig",
    "TrainSection",
    "TuneSection",
    "apply_values",
    "check_model",
    "expand_env",
    "load_pipeline",
    "load_task",
    "load_yaml",
    "max_curriculum_steps",
    "resolve_source",
    "task_file",
    "validate",
    "validation_metric_names",
]
