"""The model's precision policy: what computes in fp32 whatever dtype the weights are stored in.

The DiT's weights may be fp32 (CPU training, the default), bf16 for inference (`DiT.to_inference_dtype`: the
small conditioning modules kept fp32), or every parameter bf16: DeepSpeed's bf16 mode casts the whole module
(norm weights, embedders, modulation tables too) and keeps the fp32 masters in the optimizer. The network
computes the same way in all three:

- the residual stream x (B, N, D) is fp32, and so is everything added to it once the add is done;
- norms compute in fp32 (`FP32LayerNorm`: input, weight and bias upcast) and return fp32;
- the condition path (timestep features and MLP, pooled-caption MLP, adaLN projections: a few rows per clip,
  no per-token cost) computes in fp32 on upcast weights (`FP32Linear`), so every token's shift, scale and gate
  keep fp32 precision (Wan and Open-Sora keep them fp32 for the same reason);
- per-token matrix products (attention projections, the MLP, patch embedding, output layer) run in their
  weight's dtype: `weight_dtype(linear)` says which, and the fp32 activations are cast to it at the Linear.

Both modules call their own weights inside their own `forward`, so DeepSpeed ZeRO-3 (which gathers a module's
parameters in that module's forward hook) works unchanged; their state-dict keys are torch's. In fp32 they are
exactly `nn.Linear` / `nn.LayerNorm`. Dynamic int8 quantisation (`quantize_dynamic({nn.Linear})`, exact types)
leaves `FP32Linear` in float: the condition path stays fp32 there too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _fp32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


class FP32Linear(nn.Linear):
    """A Linear that computes in fp32 on fp32 inputs whatever its weight's dtype (upcast at use), outside autocast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.weight.float(), _fp32(self.bias))


class FP32LayerNorm(nn.LayerNorm):
    """A LayerNorm computed in fp32 (input and affine weights upcast) that returns fp32: it reads the fp32
    residual stream, and a bf16 weight beside an fp32 input is an error in torch (`mixed dtype`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x.float(), self.normalized_shape, _fp32(self.weight), _fp32(self.bias), self.eps)


def weight_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a per-token Linear computes in: its weight's; fp32 for a dynamically quantised one (int8 takes
    float in). Under LoRA (peft) the wrapped Linear's `weight` is the base layer's."""
    weight = getattr(module, "weight", None)
    return weight.dtype if isinstance(weight, torch.Tensor) else torch.float32


__all__ = ["FP32LayerNorm", "FP32Linear", "weight_dtype"]
