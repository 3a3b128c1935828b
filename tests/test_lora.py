"""The lean LoRA forward used in training: same outputs and gradients as peft's, and a
dropout with nn.Dropout's distribution that draws only the dropped positions."""

import copy
import math
import types

import pytest
import torch

from styletune.lora import _lean_forward, lean_lora, sparse_dropout
from test_losses import grads, peft_lora
from test_train import config, corpus  # noqa: F401  (corpus is a fixture)


# ------------------------------------------------------------------------------ dropout

def within_sigmas(count, n, p, sigmas=6):
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("p", [0.05, 0.2])
def test_sparse_dropout_drops_at_rate_p_everywhere_and_rescales_the_rest(p):
    torch.manual_seed(0)
    x = torch.ones(4, 50_000)
    y = sparse_dropout(x, p)
    assert y.shape == x.shape and y.dtype == x.dtype
    dropped = y == 0
    values = torch.unique(y).tolist()
    assert values[0] == 0.0 and values[1:] == [pytest.approx(1 / (1 - p))]
    assert within_sigmas(dropped.sum().item(), x.numel(), p)
    # Every stretch of the tensor, the last one included: the drawn gaps reach its end.
    for part in dropped.view(-1).chunk(10):
        assert within_sigmas(part.sum().item(), part.numel(), p), part.float().mean()
    # Independent positions: the chance that both neighbours are dropped is p squared.
    flat = dropped.view(-1)
    assert within_sigmas((flat[1:] & flat[:-1]).sum().item(), flat.numel() - 1, p * p)


def test_sparse_dropout_follows_torch_seed_and_passes_gradients_through_the_mask():
    x = torch.randn(3, 7, 11, requires_grad=True)
    torch.manual_seed(5)
    a = sparse_dropout(x, 0.1)
    torch.manual_seed(5)
    b = sparse_dropout(x, 0.1)
    assert torch.equal(a, b)
    a.sum().backward()
    kept = a != 0
    torch.testing.assert_close(x.grad, kept.float() / 0.9)
    assert sparse_dropout(x, 0.0) is x


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


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lean_forward_gives_peft_outputs_and_gradients(family):
    peft_model, lean = twin_models(family)
    batch = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    want_loss, want = loss_grads(peft_model.train(), batch)
    got_loss, got = loss_grads(lean.train(), batch)
    assert got_loss == pytest.approx(want_loss, rel=1e-6)
    assert want.keys() == got.keys() and any("lora_A" in k for k in want)
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_lean_forward_with_dropout_is_base_plus_scaled_update_of_the_dropped_input():
    peft_model, lean = twin_models("llama", lora_dropout=0.1)
    layer = lean.base_model.model.model.layers[0].mlp.down_proj
    assert isinstance(layer.forward, types.MethodType) and layer.forward.__func__ is _lean_forward
    x = torch.randn(2, 5, layer.in_features)
    lean.train()
    torch.manual_seed(3)
    got = layer(x)
    torch.manual_seed(3)
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    want = layer.base_layer(x) + b(a(sparse_dropout(x, 0.1))) * layer.scaling["default"]
    torch.testing.assert_close(got, want)
    lean.eval()
    peft_model.eval()  # no dropout: peft's own output
    torch.testing.assert_close(layer(x), peft_model.base_model.model.model.layers[0].mlp.down_proj(x))


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
