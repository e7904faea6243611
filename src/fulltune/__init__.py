"""fulltune: full-parameter fine-tuning of causal LMs with Lightning + Hydra.

Nothing heavy is imported here so that `python train.py --help` answers in seconds.
"""

from fulltune.quiet import quiet_loggers

__version__ = "0.1.0"

quiet_loggers()  # before any library loads; `debug=true` shows their lines again (fulltune.train)
