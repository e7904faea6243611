"""fulltune: full-parameter fine-tuning of causal LMs with Lightning + Hydra.

Nothing heavy is imported here so that `python train.py --help` answers in seconds.
"""

__version__ = "0.1.0"
