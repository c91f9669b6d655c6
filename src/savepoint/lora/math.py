"""Pure LoRA merge math on tensors: no files, no peft, no modules.

Every function computes in float32 and returns float32; the caller casts back to the storage dtype.
Weights come in their *stored* layout: `nn.Linear` keeps (out, in), GPT-2's `Conv1D` keeps (in, out),
which is what `transposed=True` says. Internally everything is turned to (out, in) first, so each
variant is written once.

    >>> import torch
    >>> w = torch.zeros(3, 2); a = torch.ones(1, 2); b = torch.ones(3, 1)
    >>> merge_linear(w, a, b, scaling=0.5)[0].tolist()
    [0.5, 0.5]
"""

from __future__ import annotations

import math

import torch


def lora_scaling(alpha: float, r: int, *, rslora: bool = False) -> float:
    """The factor in front of `B @ A`: `alpha / r`, or `alpha / sqrt(r)` for rsLoRA.

    >>> lora_scaling(16, 4), lora_scaling(16, 4, rslora=True)
    (4.0, 8.0)
    """
    return alpha / math.sqrt(r) if rslora else alpha / r


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32)


def merge_linear(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    *,
    scaling: float,
    transposed: bool = False,
    magnitude: torch.Tensor | None = None,
) -> torch.Tensor:
    """`W + scaling * B @ A` for a linear layer; with `magnitude`, the DoRA merge.

    `lora_a` is (r, in) and `lora_b` is (out, r) whatever the base layout. DoRA rescales each output
    row of the merged weight to the trained magnitude: `m / ||W + s B A||_row * (W + s B A)`, the norm
    taken over the *unmerged* weight plus delta, as peft's forward does.
    """
    a, b = _f32(lora_a), _f32(lora_b)
    # One fused pass (addmm) in the stored layout: no transposed copy of the big weight is made.
    if transposed:
        merged = torch.addmm(_f32(weight), a.T, b.T, alpha=scaling)
    else:
        merged = torch.addmm(_f32(weight), b, a, alpha=scaling)
    if magnitude is not None:
        row_dim = 0 if transposed else 1  # the output features are columns in Conv1D's layout
        factor = _f32(magnitude) / torch.linalg.norm(merged, dim=row_dim)
        merged *= factor.view(1, -1) if transposed else factor.view(-1, 1)
    return merged


def merge_embedding(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    *,
    scaling: float,
    magnitude: torch.Tensor | None = None,
) -> torch.Tensor:
    """`E + scaling * (B @ A).T` for an embedding (num_embeddings, dim); with `magnitude`, DoRA.

    peft stores `lora_embedding_A` as (r, num_embeddings) and `lora_embedding_B` as (dim, r). DoRA on
    an embedding normalizes each embedding *column* (over the vocabulary), unlike a linear layer.
    """
    merged = torch.addmm(_f32(weight), _f32(lora_a).T, _f32(lora_b).T, alpha=scaling)
    if magnitude is not None:
        merged *= (_f32(magnitude) / torch.linalg.norm(merged, dim=0)).view(1, -1)
    return merged


def merge_bias(bias: torch.Tensor, lora_bias: torch.Tensor, *, scaling: float) -> torch.Tensor:
    """A base-layer bias plus the scaled bias of `lora_B` (peft's `lora_bias=True`)."""
    return _f32(bias) + scaling * _f32(lora_bias)


def fits(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether float32 `t` is all finite and stays finite when cast to `dtype`.

    One vectorized min/max pass in float32: several times faster than `isfinite` (or `abs().amax()`),
    which matters because it runs over every merged weight.
    """
    if t.numel() == 0 or not dtype.is_floating_point:
        return True
    low, high = torch.aminmax(t)  # NaN propagates into both
    limit = torch.finfo(dtype).max
    return bool(-limit <= float(low)) and bool(float(high) <= limit)  # False for NaN and Inf too


def first_non_finite(t: torch.Tensor) -> str | None:
    """None if every value is finite, else a short description of the first bad one."""
    if not t.is_floating_point():
        return None
    bad = ~torch.isfinite(t)
    if not bool(bad.any()):
        return None
    index = tuple(int(i) for i in bad.nonzero()[0])
    return f"{t[index].item()} at index {list(index)} ({int(bad.sum())} non-finite value(s))"


def merge_experts(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    *,
    scaling: float,
    transposed: bool = False,
) -> torch.Tensor:
    """`W[e] + scaling * B_e @ A_e` for every expert `e` of a fused 3-D expert weight (peft's LoRA on a
    raw parameter, `target_parameters`).

    `weight` is (experts, out, in), or (experts, in, out) with `transposed`. peft keeps one `lora_A` of
    (experts * r, in) with expert-major rows and one `lora_B` of (out, r * experts) whose columns run
    rank-major (column `k * experts + e` is rank `k` of expert `e`).

    >>> w = torch.zeros(2, 3, 2); a = torch.ones(2, 2); b = torch.ones(3, 2)
    >>> merge_experts(w, a, b, scaling=0.5)[1].tolist()
    [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]
    """
    experts = int(weight.shape[0])
    a = _f32(lora_a).reshape(experts, -1, lora_a.shape[-1])  # (experts, r, in)
    b = _f32(lora_b).reshape(lora_b.shape[0], -1, experts).permute(2, 0, 1)  # (experts, out, r)
    if transposed:
        return torch.baddbmm(_f32(weight), a.transpose(1, 2), b.transpose(1, 2), alpha=scaling)
    return torch.baddbmm(_f32(weight), b, a, alpha=scaling)
