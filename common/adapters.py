"""Houlsby bottleneck adapters (peft has none): Linear(d, dim) -> ReLU -> dropout -> Linear(dim, d), residual.

One adapter sits on the output of every matched module (by default each self-attention's output
projection and each FFN's output, i.e. two per layer as in π-Tuning's original code), before the
layer's residual add. `AdapterModel` saves and loads like a peft model: adapter_config.json +
adapter_model.safetensors, and `from_pretrained(backbone, dir)` gives the model back.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


class Adapter(torch.nn.Module):
    def __init__(self, d: int, dim: int, dropout: float = 0.0):
        super().__init__()
        self.down, self.up = torch.nn.Linear(d, dim), torch.nn.Linear(dim, d)
        self.dropout = torch.nn.Dropout(dropout)
        # N(0, 0.02) as the original; zero bias so the start is near identity
        for lin in (self.down, self.up):
            torch.nn.init.normal_(lin.weight, std=0.02)
            torch.nn.init.zeros_(lin.bias)

    def forward(self, x):
        return x + self.up(self.dropout(torch.relu(self.down(x))))


def _apply_adapter(module, inputs, output):
    return module.adapter(output)


class AdapterModel(torch.nn.Module):
    """A frozen backbone with an adapter after every module matching `target_modules` (a full-name regex)."""

    def __init__(self, model, target_modules: str, dim: int, dropout: float = 0.0):
        super().__init__()
        self.base_model = model
        self.config_dict = {
            "expert_type": "houlsby_adapter",
            "target_modules": target_modules,
            "dim": dim,
            "dropout": dropout,
        }
        sites = [
            (n, m)
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and re.fullmatch(target_modules, n)
        ]
        if not sites:
            raise ValueError(
                f"adapter target_modules {target_modules!r} matches no Linear module of the backbone"
            )
        # the adapter is a child of the module it follows: `...out_proj.adapter.down.weight`
        for _, m in sites:
            m.add_module("adapter", Adapter(m.out_features, dim, dropout).to(m.weight.device, m.weight.dtype))
            m.register_forward_hook(_apply_adapter)

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def unload(self):
        """The backbone as it was: adapters and their hooks removed."""
        for m in self.base_model.modules():
            if "adapter" in m._modules:
                del m._modules["adapter"]
                for key, hook in list(m._forward_hooks.items()):
                    if hook is _apply_adapter:
                        del m._forward_hooks[key]
        return self.base_model

    def get_base_model(self):
        return self.base_model

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if ".adapter." in k}

    def save_pretrained(self, path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG).write_text(json.dumps(self.config_dict, indent=1) + "\n")
        save_file({k: v.contiguous() for k, v in self.adapter_state_dict().items()}, str(path / WEIGHTS))

    @classmethod
    def from_pretrained(cls, model, path) -> AdapterModel:
        c = json.loads((Path(path) / CONFIG).read_text())
        out = cls(model, c["target_modules"], c["dim"], c["dropout"])
        out.load_adapter_weights(load_file(str(Path(path) / WEIGHTS)))
        return out

    def load_adapter_weights(self, weights: dict[str, torch.Tensor]) -> None:
        missing = set(self.adapter_state_dict()) - set(weights)
        unexpected = set(weights) - set(self.adapter_state_dict())
        if missing or unexpected:
            raise KeyError(
                f"adapter tensors differ: missing {sorted(missing)[:2]}, unexpected {sorted(unexpected)[:2]}"
            )
        self.load_state_dict(weights, strict=False)
