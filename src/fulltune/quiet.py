"""Third-party lines about a library rather than the run, dropped at their source (by logger, and by
message where a logger also says useful things); `debug=true` shows them all. Imports nothing heavy:
`fulltune/__init__.py` applies it before any library loads."""

from __future__ import annotations

import logging
import warnings

# torchao (imported by transformers where installed) warns that its CUDA-only kernels do not load on a
# CPU build and registers enums with torch's pytree, which logs a deprecation for each; matplotlib
# (imported by torchmetrics, which Lightning imports) announces its font cache on a fresh machine
QUIET_LOGGERS = ("torchao", "torch.utils._pytree", "matplotlib")
# DeepSpeed (imported by transformers and accelerate wherever it is installed, whether the run uses it
# or not) announces the CPU it falls back to; it resets its logger's level when imported, so by message
QUIET_MESSAGES = {"DeepSpeed": ("Setting accelerator to CPU",)}
# Python warnings libraries raise about their own internals, nothing a user can act on: (message regex, module
# regex of where it is raised). torchdata and Lightning on each other's deprecations; torch's AOT autograd cache
# on torchao's 8-bit / 4-bit optimizer states (`optimizer=adamw8bit`), which implement no stable hash; Lightning's
# lr_monitor copying the tensor LR of torchao's optimizers with torch.tensor()
QUIET_WARNINGS = (
    ("'set_vital' is deprecated", "torchdata"),
    (r".*isinstance\(treespec, LeafSpec\)", "lightning"),
    (r".* does not implement _stable_hash_for_caching", r"torch\._functorch"),
    ("To copy construct from a tensor", r"lightning\.pytorch\.callbacks\.lr_monitor"),
)


class DropMessages(logging.Filter):
    """Drops records whose message starts with one of `prefixes`."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_loggers(quiet: bool = True) -> None:
    """Quiet the loggers, messages and warnings above (`quiet=False`, i.e. `debug=true`: show them again)."""
    for message, module in QUIET_WARNINGS:  # the filter added last wins: "default" undoes an earlier "ignore"
        warnings.filterwarnings("ignore" if quiet else "default", message=message, module=module)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR if quiet else logging.NOTSET)
    for name, prefixes in QUIET_MESSAGES.items():
        logger = logging.getLogger(name)
        for f in [f for f in logger.filters if isinstance(f, DropMessages)]:
            logger.removeFilter(f)
        if quiet:
            logger.addFilter(DropMessages(prefixes))
