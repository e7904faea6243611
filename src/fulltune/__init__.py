"""fulltune: full-parameter fine-tuning of causal LMs with Lightning + Hydra.

Nothing heavy is imported here so that `python train.py --help` answers in seconds.
"""

import logging
from pathlib import PurePosixPath

from omegaconf import OmegaConf

__version__ = "0.1.0"

# Harmless third-party noise, quieted at its source: torchao (imported by transformers when installed)
# warns that its CUDA-only kernels do not load on CPU builds, and registers enums with torch's pytree,
# which logs a deprecation for each. Errors still show.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)

# `model=hf`'s name: the last part of `model.pretrained` (a dir or a hub id), so runs are named after the model.
OmegaConf.register_new_resolver(
    "weights_name", lambda pretrained: PurePosixPath(str(pretrained).rstrip("/")).name if pretrained else "hf",
    replace=True,
)
