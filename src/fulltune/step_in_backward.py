"""The optimizer step inside backward (`optimizer.step_in_backward=true`).

Each trainable parameter gets its own optimizer, stepped by a post-accumulate-grad hook the moment
backward has produced that parameter's gradient, which is then freed: whole-model gradients never
exist, only the few a layer's backward holds at once. Under DDP the step runs in DDP's own
communication hook, on the all-reduced gradient.

`StepInBackward` stands for all of them towards Lightning and the LR scheduler. Its `param_groups`
are the per-parameter optimizers' own group dicts, looked up each time (loading a state dict replaces
them), so a scheduler stepping it sets the LR every parameter steps with: a wrapper with param groups
of its own, or holding the groups it saw first, would leave the inner optimizers at an old LR. Its
state dict holds every inner optimizer's, so checkpoints and `resume=auto` are exact. `skip` (set by
`NonFiniteGuard` before backward, from the step's loss) makes a backward step nothing and drop its
gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

import torch
from omegaconf import DictConfig

from fulltune.preflight import ConfigError


class _State(MutableMapping):
    """`optimizer.state` across the per-parameter optimizers (Lightning moves state tensors through it)."""

    def __init__(self, owner: dict[torch.Tensor, torch.optim.Optimizer]) -> None:
        self._owner = owner

    def __getitem__(self, param: torch.Tensor) -> Any:
        return self._owner[param].state[param]

    def __setitem__(self, param: torch.Tensor, value: Any) -> None:
        self._owner[param].state[param] = value

    def __delitem__(self, param: torch.Tensor) -> None:
        del self._owner[param].state[param]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (p for p in self._owner if p in self._owner[p].state)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class StepInBackward(torch.optim.Optimizer):
    """One `factory` optimizer per trainable parameter (its group's settings), stepped in backward.

    `step(closure)` runs the closure (forward + backward, where every parameter is stepped); Lightning
    calls it as it calls any optimizer's step.
    """

    in_backward = True

    def __init__(self, params: list[dict], factory: Callable[..., torch.optim.Optimizer]) -> None:
        groups = [{**group, "params": [p]} for group in params for p in group["params"]]
        super().__init__([p for group in groups for p in group["params"]], {})
        self.optimizers = [factory([group]) for group in groups]
        self.defaults = self.optimizers[0].defaults
        self._owner = {group["params"][0]: o for group, o in zip(groups, self.optimizers, strict=True)}
        self.state = _State(self._owner)
        self.skip = False
        self._hooks = [group["params"][0].register_post_accumulate_grad_hook(self._step_hook(o))
                       for group, o in zip(groups, self.optimizers, strict=True)]

    @property
    def param_groups(self) -> list[dict]:
        """The inner optimizers' own group dicts, looked up on every use: `load_state_dict` replaces them.
        (Until they exist, inside `Optimizer.__init__`, the groups it builds.)"""
        if "optimizers" not in self.__dict__:
            return self.__dict__["_checked_groups"]
        return [g for o in self.optimizers for g in o.param_groups]

    @param_groups.setter
    def param_groups(self, groups: list[dict]) -> None:
        self.__dict__["_checked_groups"] = groups  # only `Optimizer.__init__` sets them

    def _step_hook(self, optimizer: torch.optim.Optimizer) -> Callable[[torch.Tensor], None]:
        def step(param: torch.Tensor) -> None:
            if not self.skip:
                optimizer.step()
            param.grad = None
        return step

    def attach(self, model: torch.nn.Module) -> None:
        """Hand the steps to DDP when `model` is its wrapper: each gradient bucket is all-reduced and its
        parameters stepped on the reduced gradients, in the bucket's communication hook (torch's own
        optimizer-in-backward hook needs an accelerator stream, so it cannot run on CPU)."""
        from torch.nn.parallel import DistributedDataParallel

        if not isinstance(model, DistributedDataParallel):
            return
        for hook in self._hooks:  # a local hook would step the gradient before its all-reduce
            hook.remove()
        model.register_comm_hook(model.process_group, self._ddp_hook)
        model.reducer._set_optimizer_in_backward()  # the reducer then leaves `.grad` unset after backward

    def _ddp_hook(self, group, bucket):  # noqa: ANN001, ANN202  DDP accepts only GradBucket or no annotation
        """All-reduce (mean) one bucket, then step each of its parameters on its reduced gradient."""
        import torch.distributed as dist

        buffer = bucket.buffer().div_(dist.get_world_size(group))
        reduced = dist.all_reduce(buffer, group=group, async_op=True).get_future()

        def step(_: Any) -> torch.Tensor:
            for param, grad in zip(bucket.parameters(), bucket.gradients(), strict=True):
                if not self.skip:
                    param.grad = grad
                    self._owner[param].step()
                param.grad = None
            return buffer

        return reduced.then(step)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for param in group["params"]:
                param.grad = None

    def state_dict(self) -> dict[str, Any]:
        return {"per_parameter": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = state_dict["per_parameter"]
        if len(states) != len(self.optimizers):
            raise ConfigError(f"the checkpoint holds {len(states)} per-parameter optimizer states, this model trains "
                              f"{len(self.optimizers)} parameters: resume with the finetune settings it was saved with")
        for optimizer, state in zip(self.optimizers, states, strict=True):
            optimizer.load_state_dict(state)


def check_step_in_backward(cfg: DictConfig) -> None:
    """What cannot run with the step inside backward, refused before anything loads."""
    if not cfg.optimizer.get("step_in_backward"):
        return
    why = "optimizer.step_in_backward=true steps each parameter as soon as its gradient exists, so"
    if cfg.trainer.get("accumulate_grad_batches", 1) > 1:
        raise ConfigError(f"{why} gradients cannot accumulate over micro-batches (trainer.accumulate_grad_batches="
                          f"{cfg.trainer.accumulate_grad_batches}): raise data.batch_size instead, or set "
                          "optimizer.step_in_backward=false")
    if (cfg.trainer.get("gradient_clip_val") or 0) > 0:
        raise ConfigError(f"{why} no global gradient norm exists to clip by (trainer.gradient_clip_val="
                          f"{cfg.trainer.gradient_clip_val}): set trainer.gradient_clip_val=null, or "
                          "optimizer.step_in_backward=false")
    if cfg.precision.value == "16-mixed":
        raise ConfigError(f"{why} fp16 loss scaling cannot unscale (or skip) the step first: use precision="
                          "bf16_mixed / bf16_true, or optimizer.step_in_backward=false")
    if cfg.strategy.name not in ("auto", "ddp"):
        raise ConfigError(f"{why} it needs the whole gradient of a parameter in backward; strategy="
                          f"{cfg.strategy.name} reduces or steps gradients its own way. Use strategy=auto or ddp.")
