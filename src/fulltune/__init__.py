"""fulltune: full-parameter fine-tuning of causal LMs with Lightning + Hydra.

Nothing heavy is imported here so that `python train.py --help` answers in seconds.
"""

from pathlib import PurePosixPath

from omegaconf import OmegaConf

from fulltune.quiet import quiet_loggers

__version__ = "0.1.0"

quiet_loggers()  # before any library loads; `debug=true` shows their lines again (fulltune.train)

# `model=hf`'s name: the last part of `model.pretrained` (a dir or a hub id), so runs are named after the model.
OmegaConf.register_new_resolver(
    "weights_name", lambda pretrained: PurePosixPath(str(pretrained).rstrip("/")).name if pretrained else "hf",
    replace=True,
)
# `optimizer.lr: ${scaled:${finetune.lr},5}`: a multiple of the method's own LR (the demo job trains at 5x it).
OmegaConf.register_new_resolver("scaled", lambda value, factor: float(value) * float(factor), replace=True)
