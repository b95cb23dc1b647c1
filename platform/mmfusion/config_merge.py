"""Reading experiment YAML: `base:` inheritance and dotted `key=value` overrides (mmfusion.config validates).

Sections whose type is chosen by their `name` (the encoders: `model.encoders.text` is an lstm, a transformer
or an hf encoder, each with its own keys) follow one rule when the name changes:

- a mapping that names another type replaces the section: a file with `base: avt_digits.yaml` and
  `model.encoders.text: {name: hf, pretrained: PATH}`, or the override `model.encoders.text={name: hf, ...}`,
  gives exactly that encoder, with nothing left over from the base's lstm (embed_dim, hidden, ...);
- a dotted override of the name alone (`model.encoders.text.name=transformer`) keeps the section's keys that
  the new type also has (dim, dropout, layers) and drops the others, so the order of overrides on the
  command line does not matter (`...text.dim=64 ...text.name=transformer` keeps dim=64).

Sections with one type for every name (`model.fusion`, `optim`) always merge key by key: `optim.name=sgd`
keeps the base's lr.

The schema comes in as `root` (mmfusion.config passes ExperimentConfig): this module never imports config.
Without a root, sections merge key by key and a name override sets only the name.
"""

from __future__ import annotations

import copy
import logging
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Union

import yaml
from pydantic import BaseModel

from mmfusion.errors import ConfigError

log = logging.getLogger(__name__)

MAX_BASE_DEPTH = 8  # nested `base:` files


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value); the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=3e-4)")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r} has an empty key segment")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({e.problem})") from None
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None,
                    root: type[BaseModel] | None = None) -> dict[str, Any]:
    """Set each dotted key (creating sections on the way); a mapping value replaces the whole section."""
    out = copy.deepcopy(raw)
    for item in overrides or []:
        parts, value = parse_override(item)
        node = out
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a section")
            node = nxt
        if parts[-1] == "name" and isinstance(value, str):
            _keep_keys_of_new_type(node, parts[:-1], value, root)
        node[parts[-1]] = value
    return out


def read_yaml(path: str | Path, root: type[BaseModel] | None = None, _depth: int = 0) -> dict[str, Any]:
    """One YAML mapping; `base: other.yaml` (relative to this file) is read first, this one merged over it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level, got {type(raw).__name__}")
    base = raw.pop("base", None)  # this file's keys win
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"config file {p}: base must be a file name, got {base!r}")
        if _depth > MAX_BASE_DEPTH:
            raise ConfigError(f"config file {p}: too many nested `base:` files")
        raw = deep_merge(read_yaml(p.parent / base, root, _depth + 1), raw, root=root)
    return raw


def deep_merge(a: dict[str, Any], b: dict[str, Any], path: tuple[str, ...] = (),
               root: type[BaseModel] | None = None) -> dict[str, Any]:
    """`b` over `a`, section by section; a section of `b` that switches type (another `name`) replaces a's."""
    out = copy.deepcopy(a)
    for k, v in b.items():
        cur = out.get(k)
        if isinstance(v, dict) and isinstance(cur, dict) and not _switches_type(path + (k,), cur, v, root):
            out[k] = deep_merge(cur, v, path + (k,), root)
        else:
            out[k] = copy.deepcopy(v)
    return out


# ------------------------------------------------------------------------------ name-typed sections


def expand_annotation(t: Any) -> list[Any]:
    """The types an annotation admits: Annotated unwrapped, unions (and Optional) flattened."""
    origin = typing.get_origin(t)
    if origin is Annotated:
        return expand_annotation(typing.get_args(t)[0])
    if origin is Union or origin is types.UnionType:
        return [x for a in typing.get_args(t) for x in expand_annotation(a)]
    return [t]


def section_types(path: tuple[str, ...] | list[str], root: type[BaseModel] | None,
                  ) -> tuple[dict[str, Any], str | None]:
    """The config classes a section may be, by `name` ({"lstm": RnnTextEncoderConfig, ...}), and the name of
    its default; ({}, None) unless the section's type is chosen by its name (a discriminated union)."""
    if root is None:
        return {}, None

    def models(t: Any) -> list[type[BaseModel]]:
        return [x for x in expand_annotation(t) if isinstance(x, type) and issubclass(x, BaseModel)]

    fields: list[Any] = []
    candidates: list[Any] = [root]
    for part in path:
        fields = [m.model_fields[part] for c in candidates for m in models(c) if part in m.model_fields]
        candidates = [f.annotation for f in fields]
    variants: dict[str, Any] = {}
    for c in candidates:
        types_ = models(c)
        for t in types_ if len(types_) > 1 else []:
            tag = typing.get_args(t.model_fields["name"].annotation) if "name" in t.model_fields else ()
            if len(tag) == 1:
                variants[tag[0]] = t
    default = getattr(fields[0].default, "name", None) if variants and len(fields) == 1 else None
    return variants, default


def _switches_type(path: tuple[str, ...], cur: dict[str, Any], new: dict[str, Any],
                   root: type[BaseModel] | None) -> bool:
    if "name" not in new:
        return False
    variants, default = section_types(path, root)
    return bool(variants) and new["name"] != cur.get("name", default)


def _keep_keys_of_new_type(section: dict[str, Any], path: list[str], name: str,
                           root: type[BaseModel] | None) -> None:
    """`<path>.name=<name>` changes a name-typed section's type: drop the keys the new type does not have."""
    variants, default = section_types(path, root)
    if name not in variants or name == section.get("name", default):
        return  # not a name-typed section, the same type, or an unknown name (validation lists known ones)
    allowed = variants[name].model_fields
    dropped = [k for k in section if k not in allowed]
    for k in dropped:
        del section[k]
    if dropped:
        log.info("%s.name=%s: dropped %s (not %s keys)", ".".join(path), name, ", ".join(dropped), name)
