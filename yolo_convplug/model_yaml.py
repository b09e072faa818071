"""Model-YAML rows and the one wording of a layer error, shared by the parser patch and the swap tool."""

from __future__ import annotations


class ModelYamlError(ValueError):
    """A model YAML row that cannot be built: names the layer, the module and the fix."""


def rows(d: dict) -> list:
    """The layer rows ``backbone + head`` of a model dict, in layer-index order."""
    return list(d.get("backbone") or []) + list(d.get("head") or [])


def describe_row(i: int, row) -> str:
    """``model YAML layer 3 [-1, 1, 'SAConv2d', [256, 3, 2]]``: how every message names a layer."""
    return f"model YAML layer {i} {row!r}"


def row_error(i: int, row, message: str, cls: type[ModelYamlError] = ModelYamlError) -> ModelYamlError:
    """An error (``cls``, a ModelYamlError subclass) naming layer ``i`` and saying what is wrong and the fix."""
    return cls(f"{describe_row(i, row)}: {message}")
