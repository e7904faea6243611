"""Loading checkpoints without running code from them.

`torch.load(weights_only=True)` rebuilds tensors and plain containers only, never an arbitrary class
a pickle names. fulltune's checkpoints also hold their hyper-parameters as OmegaConf configs, so
exactly the classes those are built of are allowed beside them: containers, their nodes and
metadata, `typing.Any` and the builtin types they record. None of them runs code when rebuilt.
"""

from __future__ import annotations

import collections
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def config_classes() -> list[Any]:
    """What a pickled DictConfig / ListConfig of plain values is built of."""
    from omegaconf import DictConfig, ListConfig
    from omegaconf.base import ContainerMetadata, Metadata
    from omegaconf.nodes import AnyNode, BooleanNode, BytesNode, FloatNode, IntegerNode, PathNode, StringNode

    nodes = [AnyNode, BooleanNode, BytesNode, FloatNode, IntegerNode, PathNode, StringNode]
    return [DictConfig, ListConfig, ContainerMetadata, Metadata, *nodes, typing.Any, dict, list, int, float, str,
            bool, bytes, collections.defaultdict]


@contextmanager
def checkpoint_classes_allowed() -> Iterator[None]:
    """`torch.load(weights_only=True)` inside the block also rebuilds fulltune's config objects."""
    import torch

    with torch.serialization.safe_globals(config_classes()):
        yield


def load_checkpoint_file(path: str | Path, **kwargs: Any) -> Any:
    """`torch.load` of a checkpoint file (a Lightning .ckpt, a DCP dir's meta.pt) with weights_only=True."""
    import torch

    with checkpoint_classes_allowed():
        return torch.load(path, weights_only=True, **kwargs)
