"""The pure merge math, on hand-checked numbers and on properties across random shapes."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from savepoint.lora.adapter import build_plan, split_key
from savepoint.lora.math import first_non_finite, lora_scaling, merge_bias, merge_embedding, merge_linear


def test_scaling_plain_and_rslora():
    assert lora_scaling(16, 4) == 4.0
    assert lora_scaling(16, 4, rslora=True) == 8.0
    assert math.isclose(lora_scaling(8, 3, rslora=True), 8 / math.sqrt(3))


def test_linear_by_hand():
    w = torch.zeros(2, 3)
    a = torch.tensor([[1.0, 2.0, 3.0]])
    b = torch.tensor([[1.0], [-1.0]])
    assert merge_linear(w, a, b, scaling=2.0).tolist() == [[2.0, 4.0, 6.0], [-2.0, -4.0, -6.0]]


def test_dora_rows_take_the_magnitude():
    w = torch.randn(4, 6)
    a, b = torch.randn(2, 6), torch.randn(4, 2)
    m = torch.tensor([1.0, 2.0, 3.0, 4.0])
    merged = merge_linear(w, a, b, scaling=0.5, magnitude=m)
    assert torch.allclose(torch.linalg.norm(merged, dim=1), m)


def test_dora_embedding_columns_take_the_magnitude():
    e = torch.randn(10, 4)
    a, b = torch.randn(2, 10), torch.randn(4, 2)
    m = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert torch.allclose(torch.linalg.norm(merge_embedding(e, a, b, scaling=1.0, magnitude=m), dim=0), m)


dims = st.integers(min_value=1, max_value=6)


@settings(max_examples=40, deadline=None)
@given(out=dims, inp=dims, r=dims, seed=st.integers(0, 1000), dora=st.booleans())
def test_transposed_layout_is_the_transpose(out, inp, r, seed, dora):
    gen = torch.Generator().manual_seed(seed)
    w, a, b = (torch.randn(s, generator=gen) for s in [(out, inp), (r, inp), (out, r)])
    m = torch.rand(out, generator=gen) + 0.5 if dora else None
    plain = merge_linear(w, a, b, scaling=0.7, magnitude=m)
    conv1d = merge_linear(w.T.contiguous(), a, b, scaling=0.7, transposed=True, magnitude=m)
    assert torch.allclose(conv1d, plain.T, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(num=dims, dim=dims, r=dims, seed=st.integers(0, 1000))
def test_embedding_equals_lookup_plus_lora(num, dim, r, seed):
    gen = torch.Generator().manual_seed(seed)
    e, a, b = (
        torch.randn(num, dim, generator=gen),
        torch.randn(r, num, generator=gen),
        torch.randn(dim, r, generator=gen),
    )
    ids = torch.arange(num)
    expected = e[ids] + 0.3 * (a.T[ids] @ b.T)  # how peft's forward adds an embedding LoRA
    assert torch.allclose(merge_embedding(e, a, b, scaling=0.3)[ids], expected, atol=1e-5)


def test_bias_and_dtype_roundtrip():
    merged = merge_bias(torch.ones(3, dtype=torch.bfloat16), torch.ones(3), scaling=0.5)
    assert merged.dtype == torch.float32 and merged.tolist() == [1.5, 1.5, 1.5]


def test_first_non_finite_names_the_place():
    t = torch.zeros(2, 2)
    assert first_non_finite(t) is None
    t[1, 0] = float("inf")
    assert "[1, 0]" in (first_non_finite(t) or "")
    assert first_non_finite(torch.zeros(2, dtype=torch.int64)) is None


def test_split_key_and_patterns():
    assert split_key("base_model.model.model.layers.0.q_proj.lora_A.weight") == (
        "model.layers.0.q_proj",
        "lora_A.weight",
    )
    assert split_key("base_model.model.lm_head.weight") == ("lm_head.weight", "")
    tensors = {
        "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight": torch.zeros(2, 4),
        "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight": torch.zeros(4, 2),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 4),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(4, 4),
    }
    config = {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "rank_pattern": {"k_proj": 2},
        "alpha_pattern": {"k_proj": 6},
    }
    plan = build_plan(config, tensors)
    assert plan.weights["model.layers.0.self_attn.k_proj.weight"].scaling == 3.0  # alpha 6 / rank 2
    assert plan.weights["model.layers.0.self_attn.q_proj.weight"].scaling == 2.0
