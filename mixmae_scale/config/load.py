"""YAML profiles merged in order, `--set` overrides, and strict conversion into the dataclasses.

Order: `base.yaml`, then the size profile, then an optional cluster file, then command-line
overrides, like gpt-neox's configs. Dictionaries merge key by key; lists and scalars replace.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from mixmae_scale._resources import shipped_folder
from mixmae_scale.config.schema import FREE_FORM_FIELDS, FREE_FORM_SECTIONS, Config

PROFILES_DIR = shipped_folder("profiles")  # launch/profiles/ of the repository, shipped in the wheel


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and, where known, the source."""


def profile_path(name_or_path: str) -> Path:
    """A profile is either a YAML path or the name of a shipped profile (`launch/profiles/` in the repository)."""
    if not (PROFILES_DIR / "base.yaml").exists():  # every profile merges onto it
        raise ConfigError(f"the shipped profiles are missing from {PROFILES_DIR}: reinstall mixmae-scale (in a "
                          "checkout, mixmae_scale/_resources/profiles is a symbolic link to launch/profiles, which "
                          "needs git's core.symlinks)")
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    candidate = PROFILES_DIR / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    known = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
    hint = difflib.get_close_matches(name_or_path, known, n=1)
    raise ConfigError(
        f"profile '{name_or_path}' not found (tried {path.absolute()} and {candidate}); "
        f"known profiles: {', '.join(known)}" + (f"; did you mean '{hint[0]}'?" if hint else "")
    )


ENV_SECTION = ("cluster", "env")
# What YAML 1.1 turns into another text: 010 is 8 (octal), 1:30 is 90 (sexagesimal), 1.10 is 1.1, 2024-01-01 a date.
RETYPED_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:timestamp")


def keep_env_text(node: yaml.Node, value: Any, path: tuple[str, ...] = ()) -> Any:
    """`value` (loaded from `node`, found at `path` in the configuration) with each cluster.env value that YAML read
    as a number or a date replaced by the text as typed: every rank gets the variable as text, and NCCL_* and the
    like want what the user wrote (str(8) is not 010). Blanks and booleans are left for env_problems to refuse."""
    if len(path) == len(ENV_SECTION) + 1 and path[:len(ENV_SECTION)] == ENV_SECTION:
        if isinstance(node, yaml.ScalarNode) and node.style is None and node.tag in RETYPED_TAGS:
            return node.value
        return value
    if path != ENV_SECTION[:len(path)] or not isinstance(node, yaml.MappingNode) or not isinstance(value, dict):
        return value
    for key_node, value_node in node.value:
        key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
        if isinstance(key, str) and key in value:
            value[key] = keep_env_text(value_node, value[key], (*path, key))
    return value


def read_yaml(path: Path) -> dict[str, Any]:
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, found {type(data).__name__}")
    return keep_env_text(yaml.compose(text, Loader=yaml.SafeLoader), data)


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> dict[str, Any]:
    """`a.b.c=value` becomes {'a': {'b': {'c': value}}}; the value is read as YAML (`[1,2]`, `true`), but a
    cluster.env value keeps the text typed (keep_env_text)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' is not of the form section.key=value (--set takes KEY=VALUE pairs up "
                          "to the next option; put positional arguments before --set)")
    parts = key.split(".")
    try:
        value = keep_env_text(yaml.compose(raw, Loader=yaml.SafeLoader), yaml.safe_load(raw), tuple(parts)) \
            if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML: {exc}") from exc
    nested: dict[str, Any] = {}
    cursor = nested
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return nested


def require_port(section: dict[str, Any], where: str) -> None:
    """A cluster file's `master_port` outside 1-65535, refused where the file is read, naming it: the sbatch scripts'
    exports (cluster/shell_env.py) passed 70000 on and every rank failed at the rendezvous instead. 0 means nothing
    here (each node's store would pick its own port, which the others cannot find), so it is refused too. A value
    of another type is left to the typed config's own refusal."""
    port = section.get("master_port") if isinstance(section, dict) else None
    if isinstance(port, int) and not isinstance(port, bool) and not 1 <= port <= 65535:
        raise ConfigError(f"{where}: cluster.master_port={port} is not a TCP port (1-65535)")


def merge_sources(profile: str, cluster: str | None = None, overrides: list[str] | tuple[str, ...] = ()
                  ) -> tuple[dict[str, Any], list[str]]:
    """Merge base, profile, cluster file and overrides; returns the raw dict and the sources used."""
    sources: list[str] = []
    merged: dict[str, Any] = {}
    base = PROFILES_DIR / "base.yaml"
    chosen = profile_path(profile)
    for path in ([base] if chosen.resolve() != base.resolve() else []) + [chosen]:
        merged = deep_merge(merged, read_yaml(path))
        sources.append(str(path))
    if cluster:
        cluster_path = Path(cluster)
        if not cluster_path.exists():
            raise ConfigError(f"cluster file '{cluster}' does not exist (tried {cluster_path.absolute()})")
        if cluster_path.is_dir():
            raise ConfigError(f"cluster file '{cluster}' is a folder; name the YAML file (as "
                              "launch/cluster.example.yaml, which `mixmae templates DIR` writes out)")
        data = read_yaml(cluster_path)
        require_port((data.get("cluster") or {}) if isinstance(data, dict) else {}, str(cluster_path))
        merged = deep_merge(merged, data)
        sources.append(str(cluster_path))
    for text in overrides:
        merged = deep_merge(merged, parse_override(text))
        sources.append(f"--set {text}")
    return merged, sources


def _valid_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            keys.extend(_valid_keys(hint, f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _unknown_key_error(dotted: str) -> ConfigError:
    candidates = _valid_keys(Config)
    section = dotted.split(".")[0]
    leaf = dotted.split(".")[-1]
    # Prefer a match on the whole dotted name; fall back to the leaf name in any section.
    hint = difflib.get_close_matches(dotted, candidates, n=1, cutoff=0.6)
    if not hint:
        by_leaf = {k.split(".")[-1]: k for k in candidates if k.startswith(section + ".")}
        leaf_hint = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.5)
        hint = [by_leaf[leaf_hint[0]]] if leaf_hint else []
    message = f"unknown configuration key '{dotted}'"
    if hint:
        message += f"; did you mean '{hint[0]}'?"
    else:
        sections = sorted({k.split('.')[0] for k in candidates})
        message += f"; valid sections: {', '.join(sections)}"
    return ConfigError(message)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"'{key}': cannot be null")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"'{key}' must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"'{key}' must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, f"{key}.")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"'{key}' must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ConfigError(f"'{key}' must be an integer, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"'{key}' must be an integer, got {value!r}") from None
        if not number.is_integer():
            raise ConfigError(f"'{key}' must be an integer, got {value!r}")
        return int(number)
    if hint is float:
        # PyYAML reads '1.5e-4' as a string (YAML 1.1); accept numeric strings here.
        if isinstance(value, bool):
            raise ConfigError(f"'{key}' must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"'{key}' must be a number, got {value!r}") from None
    if hint is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"'{key}' must be a string, got {value!r}")
    if hint is typing.Any:
        return value
    raise ConfigError(f"'{key}': unsupported type {hint}")


def build_dataclass(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Strictly convert a nested dict into `cls`: unknown keys and wrong types are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or 'config'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            if "[" in prefix:  # an entry of a list of records (data.sources[1]): suggest among its own fields
                hint = difflib.get_close_matches(str(key), sorted(names), n=1)
                raise ConfigError(f"unknown configuration key '{prefix}{key}'" + (
                    f"; did you mean '{prefix}{hint[0]}'?" if hint else f"; valid keys: {', '.join(sorted(names))}"))
            inner, value = "", data[key]  # `--set clusterr.num_nodes=2` arrives as {"clusterr": {"num_nodes": 2}}
            while isinstance(value, dict) and len(value) == 1:
                (name, value), = value.items()
                inner += f".{name}"
            raise _unknown_key_error(f"{prefix}{key}{inner}")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in data]
    if missing:
        raise ConfigError(f"'{prefix}{missing[0]}' is required")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        dotted = f"{prefix}{name}"
        if dataclasses.is_dataclass(hint):
            kwargs[name] = build_dataclass(hint, value, dotted + ".")
        elif dotted in FREE_FORM_SECTIONS or dotted in FREE_FORM_FIELDS:
            if not isinstance(value, dict):
                raise ConfigError(f"'{dotted}' must be a mapping, got {value!r}")
            kwargs[name] = value
        else:
            kwargs[name] = _coerce(value, hint, dotted)
    return cls(**kwargs)


def load_config(profile: str, cluster: str | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> tuple[Config, list[str]]:
    merged, sources = merge_sources(profile, cluster, overrides)
    return build_dataclass(Config, merged), sources
