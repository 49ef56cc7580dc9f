"""Shared by strategies that add adapter layers: target resolution, error wording, what is "new"."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ftlab.adapters import adapter_params
from ftlab.errors import UserError
from ftlab.methods.groups import auto_lora_targets, auto_ssf_targets
from ftlab.module import ClassifierModule

_AUTO = {"targets": auto_lora_targets, "ssf_targets": auto_ssf_targets}


class AdaptedModule(ClassifierModule):
    def resolve_targets(self, key: str) -> list[str]:
        """``model.<key>``: a regex or list of regexes; ``auto`` picks the backbone's usual layers."""
        value = self.hparams.get(key)
        if value in (None, "auto"):
            return _AUTO[key](self.net, self.head_name)
        return [value] if isinstance(value, str) else list(value)

    @staticmethod
    def wrap_errors(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        # The adapter API raises ValueError for bad targets/hyper-parameters: that is user input here.
        try:
            return fn(*args, **kwargs)
        except ValueError as exc:
            raise UserError(f"{fn.__name__}: {exc}") from None

    def new_parameter_names(self) -> set[str]:
        return super().new_parameter_names() | {f"net.{n}" for n in adapter_params(self.net)}
