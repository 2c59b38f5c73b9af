"""Reading the files users hand to epplan: regular files only, bounded sizes, UTF-8, safe YAML.

Every reader of a user's file (topology, model config, routing statistics, manifest, metrics) goes
through ``read_text``, and every YAML through ``load_yaml``, so that the same hostile inputs get
the same clear errors everywhere:

- a directory, a FIFO, ``/dev/zero`` or another non-regular file is refused before it is opened
  (a FIFO would block forever, ``/dev/zero`` would fill memory);
- a file larger than the reader's limit is refused before it is read;
- bytes that are not UTF-8 name the offset;
- YAML: duplicate keys are refused (PyYAML keeps the last silently), an anchor/alias structure
  whose expansion exceeds ``MAX_YAML_NODES`` (the "billion laughs" bomb) or whose nesting exceeds
  ``MAX_DEPTH`` is refused before anything walks it;
- JSON: ``NaN`` and ``Infinity`` are not JSON and are refused; nesting deeper than Python's
  parser goes is a clear error.

Each function takes the project's error type to raise (``TopologyError``, ``ConfigError``, ...).
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any

import yaml

MiB = 1 << 20
MAX_DEPTH = 64  # nesting of lists and mappings in any input document
MAX_YAML_NODES = 1_000_000  # scalars, lists and mappings after expanding aliases


def read_text(path: str | os.PathLike[str], what: str, error: type[Exception], max_bytes: int) -> str:
    """The UTF-8 text of regular file ``path``; ``error`` naming ``what`` and the problem otherwise."""
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except OSError as exc:
        raise error(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise error(f"{path}: is a directory, expected a {what}") from None
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{path}: not a regular file (a device, FIFO or socket); give a {what}") from None
    if info.st_size > max_bytes:
        raise error(f"{path}: {info.st_size:,} bytes, more than the {max_bytes // MiB:,} MiB a {what} may have")
    try:
        with open(path, "rb") as fh:
            raw = fh.read(max_bytes + 1)
    except OSError as exc:
        raise error(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None
    if len(raw) > max_bytes:
        raise error(f"{path}: more than the {max_bytes // MiB:,} MiB a {what} may have")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.start}); a {what} is a UTF-8 text file") from None


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys."""


def _mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)  # merge keys ('<<: *base') first: they may be overridden
    seen: dict = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:  # an unhashable key: let PyYAML say so
            duplicate = False
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (line {key_node.start_mark.line + 1}); each key once",
                key_node.start_mark)
        seen[key] = None
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def _check_expansion(root: yaml.Node, source: str, error: type[Exception]) -> None:
    """Refuse a composed YAML graph too large once aliases are expanded, or too deep."""
    sizes: dict[int, int] = {}
    # Iterative post-order walk; an alias is the same node object, so its size is counted once
    # per reference without walking it again.
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 1, False)]
    while stack:
        node, depth, done = stack.pop()
        if depth > MAX_DEPTH:
            raise error(f"{source}: nested more than {MAX_DEPTH} levels deep")
        if id(node) in sizes and not done:
            continue
        children = ([c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else
                    list(node.value) if isinstance(node, yaml.SequenceNode) else [])
        if not done:
            stack.append((node, depth, True))
            stack.extend((c, depth + 1, False) for c in children if id(c) not in sizes)
            continue
        total = 1 + sum(sizes.get(id(c), 1) for c in children)
        if total > MAX_YAML_NODES:
            raise error(f"{source}: expands to more than {MAX_YAML_NODES:,} values (YAML anchors and "
                        "aliases that multiply); write the values out")
        sizes[id(node)] = total


def load_yaml(text: str, source: str, error: type[Exception]) -> Any:
    """Parse YAML safely (see the module docstring); ``error`` with line and column otherwise."""
    try:
        loader = _Loader(text)
        try:
            root = loader.get_single_node()
            if root is None:
                return None
            _check_expansion(root, source, error)
            return loader.construct_document(root)
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise error(f"{source}: YAML syntax error{where}: {problem}") from None
    except RecursionError:
        raise error(f"{source}: nested more than {MAX_DEPTH} levels deep") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def load_json(text: str, source: str, error: type[Exception]) -> Any:
    """Parse JSON: no NaN or Infinity, nesting at most ``MAX_DEPTH``; ``error`` otherwise."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise error(f"{source}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except ValueError as exc:
        raise error(f"{source}: {exc}") from None
    except RecursionError:
        raise error(f"{source}: nested more than {MAX_DEPTH} levels deep") from None


def no_bool_numbers(model: type, data: Any) -> Any:
    """A pydantic ``model_validator(mode="before")`` body: refuse ``true``/``false`` given for a
    field that is not a boolean (pydantic would take ``gpus: true`` as 1 GPU)."""
    if isinstance(data, dict):
        for name, field in model.model_fields.items():
            value = data.get(field.alias or name)
            if "bool" not in str(field.annotation) and has_bool(value):
                raise ValueError(f"{name}: holds a boolean (true/false); give a number or a string")
    return data


def has_bool(value: Any) -> bool:
    """A boolean in ``value`` or in the lists inside it (nested models check their own fields)."""
    if isinstance(value, bool):
        return True
    if isinstance(value, (list, tuple)):
        return any(has_bool(v) for v in value)
    return False


def finite(value: float, name: str, error: type[Exception]) -> float:
    if not math.isfinite(value):
        raise error(f"{name} is {value}; give a finite number")
    return value
