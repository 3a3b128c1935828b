"""The lean LoRA forward used in training: same outputs and gradients as peft's, and a
dropout with nn.Dropout's distribution that draws only the dropped positions."""

import copy
import math
import types

import pytest
import torch

from styletune.lora import _lean_forward, dropped_positions, lean_lora
from test_losses import grads, peft_lora
from test_train import config, corpus  # noqa: F401  (corpus is a fixture)


# ------------------------------------------------------------------------------ dropout

def dropout_mask(n, p):
    """The keep-mask (0 or 1 / (1 - p)) that the lean forward applies for the current RNG state."""
    mask = torch.full((n + 1,), 1 / (1 - p))
    mask[dropped_positions(n, p)] = 0.0  # index n: the spare slot
    return mask[:n]


def within_sigmas(count, n, p, sigmas=6):
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("p", [0.05, 0.2, 0.5])
def test_dropped_positions_drop_at_rate_p_everywhere_independently(p):
    torch.manual_seed(0)
    n = 200_000
    pos = dropped_positions(n, p)
    real = pos[pos < n]
    assert torch.all(real[1:] > real[:-1]) and torch.all(pos[len(real):] == n)  # increasing, then spares
    dropped = torch.zeros(n, dtype=torch.bool)
    dropped[real] = True
    assert within_sigmas(dropped.sum().item(), n, p)
    # Every stretch of the tensor, the last one included: the drawn gaps reach its end.
    for part in dropped.chunk(10):
        assert within_sigmas(part.sum().item(), part.numel(), p), part.float().mean()
    # Independent positions: the chance that both neighbours are dropped is p squared.
    assert within_sigmas((dropped[1:] & dropped[:-1]).sum().item(), n - 1, p * p)


def test_dropped_positions_follow_torch_seed():
    torch.manual_seed(5)
    a = dropped_positions(1000, 0.1)
    torch.manual_seed(5)
    assert torch.equal(a, dropped_positions(1000, 0.1))
    assert not torch.equal(a, dropped_positions(1000, 0.1))


# ------------------------------------------------------------------------------ lean forward

def twin_models(family, **lora):
    from conftest import build_gpt2, build_llama

    base = (build_llama if family == "llama" else build_gpt2)(300, initializer_range=0.2)
    targets = ["q_proj", "v_proj", "down_proj"] if family == "llama" else ["c_attn", "c_fc", "c_proj"]
    peft_model = peft_lora(base, targets, **lora)  # init_lora_weights=False: B is not zero
    lean = copy.deepcopy(peft_model)
    adapted = [m for m in lean.modules() if hasattr(m, "lora_A")]
    assert lean_lora(lean) == len(adapted) == (6 if family == "llama" else 8)  # GPT-2: two c_proj per block
    return peft_model, lean


def loss_grads(model, batch):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # GPT-2's own dropout: the same masks for both models
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    return loss.item(), grads(model)


@pytest.mark.parametrize("family,lora", [("llama", {}), ("gpt2", {}), ("gpt2", {"bias": "all"})])
def test_lean_forward_gives_peft_outputs_and_gradients(family, lora):
    peft_model, lean = twin_models(family, **lora)  # bias="all": the base layers' biases train too
    batch = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    want_loss, want = loss_grads(peft_model.train(), batch)
    got_loss, got = loss_grads(lean.train(), batch)
    assert got_loss == pytest.approx(want_loss, rel=1e-6)
    assert want.keys() == got.keys() and any("lora_A" in k for k in want)
    assert any(k.endswith("c_fc.base_layer.bias") for k in want) == ("bias" in lora)
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lean_forward_with_dropout_is_base_plus_scaled_update_of_the_dropped_input(family):
    peft_model, lean = twin_models(family, lora_dropout=0.1)
    blocks = lean.base_model.model.model.layers if family == "llama" else lean.base_model.model.transformer.h
    layer = blocks[0].mlp.down_proj if family == "llama" else blocks[0].mlp.c_proj  # GPT-2: Conv1D, with bias
    assert isinstance(layer.forward, types.MethodType) and layer.forward.__func__ is _lean_forward
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    lean.train()
    torch.manual_seed(3)
    got = layer(x)
    got.pow(2).sum().backward()
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    got_grads = [t.grad.clone() for t in (x, a.weight, b.weight)]
    for t in (x, a.weight, b.weight):
        t.grad = None
    torch.manual_seed(3)
    mask = dropout_mask(x.numel(), 0.1).view_as(x)
    assert 0 < (mask == 0).sum() < x.numel()
    want = layer.base_layer(x) + b(a(x * mask)) * layer.scaling["default"]
    want.pow(2).sum().backward()
    torch.testing.assert_close(got, want)
    for g, t in zip(got_grads, (x, a.weight, b.weight)):
        torch.testing.assert_close(g, t.grad)
    lean.eval()
    peft_model.eval()  # no dropout: peft's own output
    peft_blocks = (peft_model.base_model.model.model.layers if family == "llama"
                   else peft_model.base_model.model.transformer.h)
    peft_layer = peft_blocks[0].mlp.down_proj if family == "llama" else peft_blocks[0].mlp.c_proj
    with torch.no_grad():
        torch.testing.assert_close(layer(x), peft_layer(x))


def test_lean_forward_leaves_disabled_and_merged_adapters_to_peft():
    peft_model, lean = twin_models("llama")
    batch = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(2))
    lean.eval()
    peft_model.eval()
    with torch.no_grad():
        adapted = lean(input_ids=batch).logits
        with lean.disable_adapter():
            plain = lean(input_ids=batch).logits
        with peft_model.disable_adapter():
            torch.testing.assert_close(plain, peft_model(input_ids=batch).logits)
        assert not torch.allclose(plain, adapted)
        lean.merge_adapter()
        torch.testing.assert_close(lean(input_ids=batch).logits, adapted, rtol=1e-4, atol=1e-5)


def test_training_uses_the_lean_forward(tmp_path, train_model_dirs, corpus):
    from styletune.training import train

    seen = []

    def on_step(step, model):
        layers = [m for n, m in model.named_modules() if n.endswith("q_proj") and hasattr(m, "lora_A")]
        seen.append(bool(layers) and all(getattr(m.forward, "__func__", None) is _lean_forward for m in layers))

    cfg = config(tmp_path, train_model_dirs["llama"], corpus, max_steps=1, eval_every=1, save_every=1)
    train(cfg, on_step=on_step)
    assert seen == [True]
