"""LoRA adapters (peft) on the frozen backbone: one named adapter per plugin view.

Several plugins share one resident backbone: each view of each plugin is a named peft adapter on the
patch embedding and every attention qkv / output projection; switching plugins switches the active
adapter, never the backbone. Adapter weights travel as plain tensors in the plugin file.

Inference of a single-view plugin needs no adapter layers: :func:`fold_state` folds the plugin's tensors into
the base weights directly, so the prediction path never imports peft (which imports transformers). peft is
imported by the functions that build adapter layers (training, multi-view plugins, ``--no-merge-lora``).
"""
from __future__ import annotations

import re
import sys
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

import torch
from torch import nn

from anymc3d.errors import PluginError

#: regex over module names: the patch-embedding conv and each block's attention qkv / output projection.
DEFAULT_TARGET = r".*(patch_embed\.proj|attn\.qkv|attn\.proj)"


@dataclass
class LoraSettings:
    """LoRA hyper-parameters of a plugin (the paper: rank 8, alpha 16, B zero-initialised)."""

    rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; the update is scaled by alpha / r."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input during training."})
    target_modules: str = field(default=DEFAULT_TARGET, metadata={"help": "Regex of the module names to adapt."})

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora.rank: must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha: must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout: must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.target_modules, str) or not self.target_modules:
            raise ValueError("lora.target_modules: must be a non-empty regex")

    def to_peft(self):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=self.target_modules, init_lora_weights=True)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LoraSettings":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"lora: unknown keys {sorted(unknown)}")
        return cls(**d)


def lora_layers(model: nn.Module) -> dict:
    """The adapted (peft) modules of ``model`` by name; none while peft was never imported."""
    if "peft" not in sys.modules:
        return {}
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def adapter_names(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for layer in lora_layers(model).values():
        names.update(layer.lora_A.keys())
    return names


def add_adapter(model: nn.Module, name: str, settings: LoraSettings) -> None:
    """Inject a fresh adapter (B = 0, so the backbone output is unchanged) named ``name``.

    The active adapter stays what it was, and every weight stays frozen: training marks what it trains
    with :func:`set_trainable`.
    """
    from peft.functional import inject_adapter_in_model

    if name in adapter_names(model):
        raise PluginError(f"adapter {name!r} is already attached")
    unmerge(model)  # injection wraps the base layers: they must hold the base weights
    active = active_adapter(model) if lora_layers(model) else None
    with warnings.catch_warnings():  # peft warns that several adapters share the model: that is the design
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        inject_adapter_in_model(settings.to_peft(), model, adapter_name=name)
    model.requires_grad_(False)
    activate(model, active)


def set_trainable(model: nn.Module, name: Optional[str]) -> None:
    """Only adapter ``name``'s weights require grad (None: nothing in the backbone does)."""
    for pname, p in model.named_parameters():
        p.requires_grad_(name is not None and f".{name}." in pname)


def remove_adapter(model: nn.Module, name: str) -> None:
    """Delete adapter ``name``; the active adapter stays active (the bare backbone if it was ``name``)."""
    from peft.functional import delete_adapter

    if merged_adapter(model) is not None:
        unmerge(model)
    active = active_adapter(model)
    delete_adapter(model, name, prefix="lora_")
    getattr(model, "peft_config", {}).pop(name, None)
    activate(model, None if active == name else active)


def active_adapter(model: nn.Module) -> Optional[str]:
    """The active adapter, or None when the bare backbone runs."""
    for layer in lora_layers(model).values():
        if layer.disable_adapters:
            return None
        return layer.active_adapters[0] if layer.active_adapters else None
    return None


def activate(model: nn.Module, name: Optional[str]) -> None:
    """Make adapter ``name`` the active one; None runs the bare backbone. Costs no weight copy, except that
    a merged adapter other than ``name`` is unmerged first (its base weights restored bit for bit)."""
    merged = merged_adapter(model)
    if name is not None and merged == name:
        return  # merged (by merge or fold_state) and so active already
    layers = lora_layers(model)
    if name is not None and name not in adapter_names(model):
        raise PluginError(f"no adapter {name!r} is attached")
    if merged is not None:
        unmerge(model)
    # peft's switches also flip requires_grad; trainability is the caller's choice, so keep it
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    if name is not None:
        from peft.functional import set_adapter

        set_adapter(model, name)
    for layer in layers.values():
        layer.enable_adapters(name is not None)
    for n, p in model.named_parameters():
        p.requires_grad_(requires_grad[n])


_BASE_COPIES = "_anymc3d_base_weights"


def merged_adapter(model: nn.Module) -> Optional[str]:
    """The adapter merged into the backbone's weights, or None."""
    copies = getattr(model, _BASE_COPIES, None)
    return copies[0] if copies else None


@torch.no_grad()
def merge(model: nn.Module, name: str) -> None:
    """Fold adapter ``name`` into the base weights (W + (alpha/r) B A) so inference runs the plain layers.

    peft's own ``unmerge`` subtracts the update again, which is not bit-exact in floating point; so the base
    weights of every adapted layer are copied first and :func:`unmerge` puts the copies back.
    """
    if merged_adapter(model) == name:
        return
    activate(model, name)
    layers = lora_layers(model)
    copies = [(w, w.detach().clone()) for w in (layer.get_base_layer().weight for layer in layers.values())]
    for layer in layers.values():
        layer.merge(adapter_names=[name])
    setattr(model, _BASE_COPIES, (name, copies))


@torch.no_grad()
def fold_state(model: nn.Module, name: str, state: dict[str, torch.Tensor], settings: LoraSettings) -> None:
    """Fold a view's LoRA tensors (:func:`adapter_state`'s layout, checked by :func:`check_state`) into the base
    weights, W + (alpha/r) B A computed in float32, without adapter layers or peft; :func:`unmerge` restores the
    base weights bit for bit, and ``name`` counts as the merged, active adapter until then.

    The conv patch embedding's B is a 1x1 conv: its update is B (out, r) applied to A (r, in, kh, kw).
    """
    if merged_adapter(model) == name:
        return
    activate(model, None)  # another merged adapter restored, peft adapters switched off
    copies = []
    for prefix in _prefixes(state):
        weight = _base(model.get_submodule(prefix)).weight
        a, b = state[f"{prefix}.lora_A.weight"].float(), state[f"{prefix}.lora_B.weight"].float()
        delta = torch.einsum("or,r...->o...", b.flatten(1), a) * (settings.alpha / settings.rank)  # W's shape
        copies.append((weight, weight.detach().clone()))
        weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))
    setattr(model, _BASE_COPIES, (name, copies))


def check_state(model: nn.Module, state: dict[str, torch.Tensor], settings: LoraSettings) -> None:
    """Refuse LoRA tensors that do not fit ``model`` under ``settings`` (as :func:`load_adapter_state` does for
    adapter layers): every targeted Linear / Conv2d needs its A and B, of the shapes rank r gives, and no more."""
    r, expected = settings.rank, {}
    for prefix, module in model.named_modules():
        base = _base(module)
        if not re.fullmatch(settings.target_modules, prefix) or not isinstance(base, (nn.Linear, nn.Conv2d)):
            continue
        out, inp, *kernel = base.weight.shape
        expected[f"{prefix}.lora_A.weight"] = (r, inp, *kernel)
        expected[f"{prefix}.lora_B.weight"] = (out, r, *[1] * len(kernel))
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        raise PluginError(f"LoRA weights do not fit the backbone: missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]}, mismatched shapes {wrong[:3]}")


def _prefixes(state: dict[str, torch.Tensor]) -> list[str]:
    return sorted({key.rsplit(".lora_", 1)[0] for key in state})


def _base(module: nn.Module) -> nn.Module:
    """The layer itself, or the base layer that a peft adapter layer wraps."""
    return getattr(module, "base_layer", module)


@torch.no_grad()
def unmerge(model: nn.Module) -> None:
    """Restore the base weights saved by :func:`merge` or :func:`fold_state` exactly; an adapter stays attached."""
    saved = getattr(model, _BASE_COPIES, None)
    if not saved:
        return
    _, copies = saved
    for weight, copy in copies:
        weight.copy_(copy)
    for layer in lora_layers(model).values():
        layer.merged_adapters = []
    setattr(model, _BASE_COPIES, None)


def adapter_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors, keyed by module path without the adapter name (portable across names)."""
    from peft.functional import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}


def load_adapter_state(model: nn.Module, name: str, state: dict[str, torch.Tensor]) -> None:
    """Load tensors from :func:`adapter_state` into adapter ``name``, refusing missing or misshaped keys."""
    from peft.functional import get_peft_model_state_dict, set_peft_model_state_dict

    expected = get_peft_model_state_dict(model, adapter_name=name)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise PluginError(f"LoRA weights do not fit the backbone: missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]}, mismatched shapes {wrong[:3]}")
    result = set_peft_model_state_dict(model, state, adapter_name=name)
    if getattr(result, "unexpected_keys", None):
        raise PluginError(f"LoRA weights were not all used: {result.unexpected_keys[:3]}")


def trainable_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
