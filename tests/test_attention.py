"""The CPU training attention (styletune.attention): the same outputs and gradients as
transformers' sdpa, and sdpa itself wherever the two-product form is not the faster."""

import pytest
import torch
import torch.nn.functional as F

from styletune import attention
from styletune.attention import causal_attention, grouped_attention, use_for_training
from styletune.training import train
from test_train import config, corpus  # noqa: F401  (corpus is a fixture)


def qkv(b=2, h=6, kv=2, t=40, d=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, t, d, generator=g).to(dtype).requires_grad_() for n in (h, kv, kv)]


def sdpa_reference(q, k, v, scaling=None):
    """transformers' order: key/value head i serves query heads i*g .. i*g+g-1."""
    g = q.shape[1] // k.shape[1]
    k, v = (x.repeat_interleave(g, dim=1) for x in (k, v))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling).transpose(1, 2)


@pytest.mark.parametrize("heads", [(6, 2), (4, 4)])  # grouped-query and plain multi-head
@pytest.mark.parametrize("scaling", [None, 0.3])
def test_grouped_attention_matches_sdpa_in_fp32(heads, scaling):
    q, k, v = qkv(h=heads[0], kv=heads[1])
    out, ref = grouped_attention(q, k, v, scaling), sdpa_reference(q, k, v, scaling)
    assert out.shape == (2, 40, heads[0], 16)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(out)
    mine = torch.autograd.grad(out, (q, k, v), grad)
    theirs = torch.autograd.grad(ref, (q, k, v), grad)
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_grouped_attention_in_bf16_is_within_bf16_rounding_of_fp32():
    q, k, v = qkv(dtype=torch.bfloat16)
    out = grouped_attention(q, k, v).float()
    exact = sdpa_reference(*(x.detach().float() for x in (q, k, v)))
    # bf16 keeps 8 significant bits: 2**-8 relative per rounding, a few roundings deep.
    assert (out - exact).abs().max() < 4 * 2**-8 * exact.abs().max()


def test_a_position_attends_only_to_itself_and_earlier_ones():
    q, k, v = qkv(t=10)
    out = grouped_attention(q, k, v)
    v2 = v.detach().clone()
    v2[:, :, 6:] += 100.0  # change the values of positions 6..9 only
    out2 = grouped_attention(q, k, v2)
    torch.testing.assert_close(out[:, :6], out2[:, :6])
    assert not torch.allclose(out[:, 6:], out2[:, 6:])


class _Layer(torch.nn.Module):
    """What transformers' attention functions read off the attention layer."""
    is_causal = True
    num_key_value_groups = 3  # qkv()'s 6 query heads on 2 key/value heads


def ops_of(fn):
    """The aten operations ``fn()`` dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    return seen


def uses_sdpa(q, k, v, mask=None, **kw):
    ops = ops_of(lambda: causal_attention(_Layer(), q, k, v, mask, **kw))
    return any("scaled_dot_product" in op for op in ops)


def test_only_short_unpadded_bf16_blocks_on_a_cpu_take_the_products():
    q, k, v = (x.detach() for x in qkv(dtype=torch.bfloat16))
    assert not uses_sdpa(q, k, v)
    assert uses_sdpa(*(x.float() for x in (q, k, v)))  # fp32: sdpa is as fast
    assert uses_sdpa(q, k, v, mask=torch.ones(2, 1, 40, 40, dtype=torch.bool))  # padding
    assert uses_sdpa(q[:, :, -1:], k, v)  # a decode step against a cache
    with pytest.raises(ValueError, match="softcap"):  # only sdpa's path refuses soft-capping
        uses_sdpa(q, k, v, softcap=30.0)
    long = attention.PRODUCTS_MAX_LEN + 1
    assert uses_sdpa(*(x.detach() for x in qkv(t=long, dtype=torch.bfloat16)))


def test_a_model_switched_to_it_gives_sdpas_loss_and_gradients_under_bf16_autocast():
    from conftest import build_gpt2, build_llama

    for build in (build_llama, build_gpt2):
        model = build(300, initializer_range=0.2).train()
        for m in model.modules():  # dropout off: both passes must see the same network
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        batch = torch.randint(0, 300, (3, 48), generator=torch.Generator().manual_seed(3))

        def loss_and_grads():
            model.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            return loss.item(), [p.grad.clone() for p in model.parameters()]

        assert model.config._attn_implementation == "sdpa"
        ref_loss, ref_grads = loss_and_grads()
        assert use_for_training(model) and model.config._attn_implementation == attention.NAME
        assert not any("scaled_dot_product" in op for op in ops_of(loss_and_grads))
        loss, grads = loss_and_grads()
        assert loss == pytest.approx(ref_loss, rel=1e-2)
        for a, b in zip(grads, ref_grads):
            assert (a - b).norm() <= 0.05 * b.norm() + 1e-6


def test_a_model_on_another_attention_keeps_it():
    from conftest import build_llama

    model = build_llama(300)
    model.set_attn_implementation("eager")
    assert not use_for_training(model)
    assert model.config._attn_implementation == "eager"


def test_training_switches_the_model_to_it(tmp_path, train_model_dirs, corpus, monkeypatch):
    switched = []
    real = attention.use_for_training
    monkeypatch.setattr(attention, "use_for_training", lambda m: switched.append(real(m)) or switched[-1])
    result = train(config(tmp_path, train_model_dirs["llama"], corpus, dtype="bfloat16", max_steps=2))
    assert switched == [True] and result.steps == 2
