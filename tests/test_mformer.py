import math

import pytest
import torch

from laser_batch.config import MFormerConfig
from laser_batch.errors import ConfigError
from laser_batch.mformer import MFormer, load_balancing_loss

ID_SIZE, LLM_SIZE = 12, 20


def _model(**overrides) -> MFormer:
    torch.manual_seed(0)
    cfg = dict(num_experts=4, num_queries=3, hidden_size=16, num_blocks=2, num_heads=2, cross_attention_freq=2,
               top_k=1, dropout=0.1)
    return MFormer(MFormerConfig(**{**cfg, **overrides}), ID_SIZE, LLM_SIZE)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randn(3, 5, ID_SIZE)
    mask = torch.tensor([[False, False, True, True, True], [False, False, False, False, True], [True] * 5])
    return ids, mask


@pytest.mark.parametrize("top_k", [1, 2])
def test_output_shapes(top_k):
    model = _model(top_k=top_k)
    out = model(*_batch())  # train mode: dropout active
    assert out.prefix.shape == (3, 3, LLM_SIZE)
    assert out.experts.shape == (3, top_k) and out.experts.dtype == torch.int64
    assert out.weights.shape == (3, top_k)
    assert out.router_probs.shape == (3, 4)
    assert out.lb_loss.shape == ()
    assert torch.isfinite(out.prefix).all()
    torch.testing.assert_close(out.router_probs.sum(-1), torch.ones(3))


def test_blocks_alternate_cross_attention():
    model = _model(num_blocks=4, cross_attention_freq=2)
    assert [b.cross_attn is not None for b in model.blocks] == [True, False, True, False]


def test_router_picks_the_highest_scoring_experts_and_weights_are_renormalised():
    model = _model(top_k=2).eval()
    with torch.no_grad():
        model.router.weight.zero_()
        model.router.bias.copy_(torch.tensor([0.0, 1.0, 5.0, 2.0]))
    out = model(*_batch())
    assert out.experts.tolist() == [[2, 3]] * 3
    expected = torch.tensor([math.exp(5), math.exp(2)]) / (math.exp(5) + math.exp(2))
    torch.testing.assert_close(out.weights, expected.expand(3, 2))
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(3))


def test_top_1_weight_is_exactly_one_and_matches_the_argmax():
    out = _model(top_k=1).eval()(*_batch())
    assert torch.all(out.weights == 1.0)
    assert torch.equal(out.experts[:, 0], out.router_probs.argmax(-1))


def test_load_balancing_loss_by_hand():
    probs = torch.tensor([
        [[0.9, 0.1], [0.7, 0.3], [0.4, 0.6]],  # first item is padding
        [[0.2, 0.8], [0.6, 0.4], [0.1, 0.9]],
    ])
    mask = torch.tensor([[False, True, True], [True, True, True]])
    # 5 valid items, argmax experts 0, 1, 1, 0, 1 -> f = (2/5, 3/5)
    # P_0 = (0.7 + 0.4 + 0.2 + 0.6 + 0.1) / 5 = 0.4, P_1 = (0.3 + 0.6 + 0.8 + 0.4 + 0.9) / 5 = 0.6
    # loss = K * sum f_j P_j = 2 * (0.4 * 0.4 + 0.6 * 0.6) = 2 * 0.52 = 1.04
    torch.testing.assert_close(load_balancing_loss(probs, mask), torch.tensor(1.04))


def test_padding_invariance():
    model = _model(top_k=2).eval()
    ids, mask = _batch()
    torch.manual_seed(2)
    extra = 100 * torch.randn(3, 4, ID_SIZE)  # arbitrary vectors in extra left padding
    padded_ids = torch.cat([extra, ids], 1)
    padded_mask = torch.cat([torch.zeros(3, 4, dtype=torch.bool), mask], 1)
    a, b = model(ids, mask), model(padded_ids, padded_mask)
    for name in ("prefix", "weights", "router_probs", "lb_loss"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-6, rtol=0)
    assert torch.equal(a.experts, b.experts)


def test_masked_items_do_not_affect_the_router():
    model = _model(top_k=2).eval()
    ids, mask = _batch()
    changed = torch.where(mask[..., None], ids, torch.full_like(ids, float("nan")))
    a, b = model(ids, mask), model(changed, mask)
    torch.testing.assert_close(a.router_probs, b.router_probs, atol=1e-6, rtol=0)
    torch.testing.assert_close(a.prefix, b.prefix, atol=1e-6, rtol=0)
    # while a real item does move them
    moved = ids.clone()
    moved[0, 2] += 3.0
    assert not torch.allclose(a.router_probs[0], model(moved, mask).router_probs[0])


def test_task_gradient_reaches_the_router_only_with_soft_top_k():
    ids, mask = _batch()
    hard = _model(top_k=1)
    hard(ids, mask).prefix.sum().backward()
    assert hard.router.weight.grad is None or torch.all(hard.router.weight.grad == 0)
    hard(ids, mask).lb_loss.backward()  # the load-balancing loss is what trains a hard router
    assert hard.router.weight.grad.abs().sum() > 0

    soft = _model(top_k=2)
    soft(ids, mask).prefix.sum().backward()
    assert soft.router.weight.grad.abs().sum() > 0


def test_single_expert_is_the_no_moe_ablation():
    out = _model(num_experts=1, top_k=1).eval()(*_batch())
    assert out.experts.tolist() == [[0]] * 3
    assert torch.all(out.router_probs == 1.0)
    assert out.lb_loss.item() == 1.0
    assert out.prefix.shape == (3, 3, LLM_SIZE)


def test_paper_preset_builds():
    with torch.device("meta"):  # shapes only: no 100M-parameter allocation
        model = MFormer(MFormerConfig(preset="paper"), id_size=64, llm_size=576)
    assert model.width == 768
    assert len(model.blocks) == 12
    assert sum(b.cross_attn is not None for b in model.blocks) == 6
    assert model.queries.shape == (8, 32, 768)
    assert model.out_proj.out_features == 576


def test_width_is_sized_to_the_llm_when_hidden_size_is_zero():
    assert _model(hidden_size=0).width == LLM_SIZE
    with torch.device("meta"):
        assert MFormer(MFormerConfig(hidden_size=0, num_blocks=1), ID_SIZE, 4096).width == 256


def test_bad_num_heads_names_the_option():
    with pytest.raises(ConfigError, match=r"mformer\.num_heads"):
        _model(hidden_size=0, num_heads=3)  # LLM width 20 is not divisible by 3


def test_output_init_scale_shrinks_the_initial_prefix_and_is_validated():
    full, small = _model(output_init_scale=1.0), _model(output_init_scale=0.1)  # same seed inside
    torch.testing.assert_close(small.out_proj.weight, full.out_proj.weight * 0.1)
    ids, mask = torch.randn(3, 5, ID_SIZE), torch.ones(3, 5, dtype=torch.bool)
    full.eval(), small.eval()
    ratio = small(ids, mask).prefix.norm() / full(ids, mask).prefix.norm()
    assert 0.05 < ratio < 0.2  # the bias starts at zero, so the prefix shrinks with the weights
    with pytest.raises(ConfigError, match="mformer.output_init_scale"):
        MFormerConfig(output_init_scale=0.0)
