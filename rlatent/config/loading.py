"""Reading a config: YAML file + `key.sub=value` overrides, validated, errors as one line with the key path;
and the flat reference of every key (`rlatent config`, docs/config.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from rlatent.config.run import RunConfig
from rlatent.errors import ConfigError


MAX_YAML_DEPTH = 32
"""Deepest nesting a config may have (the deepest real key, `grpo.rewards[i].kwargs.x`, is 5)."""


class Refused(yaml.MarkedYAMLError):
    """YAML that parses but that a config may not hold (or, for a duplicate key, that YAML forbids and PyYAML
    would take): the message is the refusal, not "not valid YAML"."""


class ConfigLoader(yaml.SafeLoader):
    """YAML's safe loader with three refusals: a key given twice in one mapping (YAML forbids it; PyYAML
    would keep the last silently); nesting deeper than `MAX_YAML_DEPTH` (the composer recurses once per
    level: hostile nesting is refused by depth, not by Python's recursion limit); and any alias (`*name`).
    An alias costs nothing to parse, but the config is validated and written out (config.yaml, run.json)
    in full, where each alias is a copy: six levels of `&b [*a, *a, ...]` in 383 bytes became a 22 MB
    config.yaml after 191 s, nine would be tens of GB. No config needs one, so they are refused outright
    rather than capped by an expanded size."""

    depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise Refused(problem=f"YAML alias *{event.anchor} refused (a config takes no aliases: each is "
                          "copied in full, and aliases of aliases grow exponentially); write the value out",
                          problem_mark=event.start_mark)
        if self.depth >= MAX_YAML_DEPTH:
            raise Refused(problem=f"nested deeper than {MAX_YAML_DEPTH} levels",
                          problem_mark=self.peek_event().start_mark)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node)
                if key in first_line:
                    raise Refused(problem=f"duplicate key {key!r} (first given at line {first_line[key]})",
                                  problem_mark=key_node.start_mark)
                first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def yaml_problem(exc: yaml.YAMLError) -> str:
    """What is wrong, in words: a refusal as it stands, a parser error as "not valid YAML (...)"."""
    problem = getattr(exc, "problem", None) or exc
    return str(problem) if isinstance(exc, Refused) else f"not valid YAML ({problem})"


def _format_validation_error(error: ValidationError, where: str) -> str:
    first = error.errors()[0]
    path = ".".join(str(part) for part in first["loc"]) or "(top level)"
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    message = message.removeprefix("Value error, ")
    extra = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"{where}: {path}: {message}{extra}"


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one `key.sub=value` override in place; the value is parsed as YAML."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key.sub=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {override!r}: empty key part")
    try:
        value = yaml.load(raw, Loader=ConfigLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {override!r}: {yaml_problem(exc)}") from None
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config (or the defaults when `path` is None), apply overrides, validate."""
    data: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            line = exc.object[: exc.start].count(b"\n") + 1
            raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x})") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the config ({exc.strerror or exc})") from None
        try:
            data = yaml.load(text, Loader=ConfigLoader) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}{line}: {yaml_problem(exc)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    for override in overrides:
        apply_override(data, override)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, where)) from None


def config_reference(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key path, default, description) for every field, sections flattened: docs/config.md's rows."""
    rows = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows += config_reference(annotation, f"{prefix}{name}.")
        else:
            default = field.default
            if isinstance(default, list) and default and isinstance(default[0], BaseModel):
                default = [item.model_dump(exclude_defaults=True) for item in default]
            default = "null" if default is None else str(default)
            rows.append((f"{prefix}{name}", default, (field.description or "").replace("\n", " ")))
    return rows
