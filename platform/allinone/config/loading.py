"""Reading config files: YAML parsed safely, validated into typed configs, one clear error.

A bad file raises :class:`ConfigError` naming the file, the field and what is wrong; unknown keys
are errors, never silently ignored. Paths inside a YAML file may use ``${VAR}`` /
``${VAR:-default}`` and are resolved relative to the file's own folder, so a config means the same
thing whatever the working directory.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

SKIMAGE_SOURCE = "skimage"


class ConfigError(ValueError):
    """One clear message: which file, which field, what is wrong."""

    def __init__(self, path: str | Path, field: str, message: str) -> None:
        self.path, self.field, self.message = str(path), field, message
        super().__init__(f"{path}: {field}: {message}" if field else f"{path}: {message}")


class Strict(BaseModel):
    # No inf or nan anywhere: `lr: .inf` would train a checkpoint of infinities.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# --------------------------------------------------------------------------- loading
def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(path, "", "file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(path, "", f"not valid YAML: {_yaml_problem(err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(path, "", "expected a mapping of fields at the top level")
    return data


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's error on one line: where (1-based line and column) and what, without the
    snippet of the file it quotes over several lines."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    return where + " ".join(problem.split())


def validate(model: type[BaseModel], data: dict[str, Any], path: str | Path) -> Any:
    """Validate ``data`` against ``model``; the first problem becomes one ConfigError."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        raise ConfigError(path, _field_name(first), _message(first)) from None


def _field_name(error: dict[str, Any]) -> str:
    # Pydantic puts union-member and validator names in loc; keep only the user's own keys.
    parts = [str(p) for p in error["loc"] if not _is_internal_loc(p)]
    return ".".join(parts) or "(top level)"


def _is_internal_loc(part: Any) -> bool:
    return isinstance(part, str) and ("[" in part or part in {"function-after", "float", "tuple"})


def _message(error: dict[str, Any]) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown field (check the spelling)"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] != "missing" and "input" in error and not isinstance(error["input"], dict):
        message += f" (got {error['input']!r})"
    return message


# --------------------------------------------------------------------------- paths
_ENV_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def expand_env(text: str) -> str:
    """Expand ``${VAR}`` and ``${VAR:-default}``; an unset variable without default is an error."""

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = os.environ.get(name) or default
        if value is None:
            raise ValueError(f"environment variable {name} is not set and has no default")
        return value

    return _ENV_VAR.sub(substitute, text)


def check_variables(path: str | Path, fields: dict[str, str | None]) -> None:
    """Every ``${VAR}`` of these path fields (name -> value) is set or has a default, before
    anything runs: a folder that need not exist here (a cluster's) may still not name nothing."""
    for field, value in fields.items():
        try:
            expand_env(value or "")
        except ValueError as err:
            raise ConfigError(path, field, str(err)) from None


def resolve_source(source: str, relative_to: Path, origin: str | Path, field: str) -> str | Path:
    """Turn a configured source into ``"skimage"`` or an existing folder; errors name the field."""
    if source == SKIMAGE_SOURCE:
        return SKIMAGE_SOURCE
    try:
        folder = Path(expand_env(source))
    except ValueError as err:
        raise ConfigError(origin, field, str(err)) from None
    folder = folder if folder.is_absolute() else (relative_to / folder)
    if not folder.is_dir():
        raise ConfigError(origin, field, f"data folder does not exist: {folder}")
    return folder.resolve()
