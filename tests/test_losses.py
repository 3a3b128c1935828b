"""The fast training path: the chunked head + cross-entropy gives the loss and the
gradients of transformers' own ``model(labels=...)``, and --train-layers trains only
the top layers (backward stops below them)."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

from styletune.losses import ChunkedLinearCrossEntropy, causal_lm_loss, supports_chunked_loss
from styletune.training import train
from test_train import config, corpus, losses  # noqa: F401  (corpus is a fixture)


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def loss_and_grads(model, batch, chunked):
    model.zero_grad(set_to_none=True)
    loss = causal_lm_loss(model, batch, chunked=chunked)
    loss.backward()
    return loss.item(), grads(model)


def peft_lora(model, targets, **kw):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    kw = {"lora_dropout": 0.0, **kw}
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **kw))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_chunked_loss_matches_transformers_loss_and_gradients(family, method):
    from conftest import build_gpt2, build_llama

    # eval(): dropout off, so both passes see the same network (gradients still flow).
    model = (build_llama if family == "llama" else build_gpt2)(300, initializer_range=0.2).eval()
    if method == "lora":
        model = peft_lora(model, ["q_proj", "v_proj"] if family == "llama" else ["c_attn"])
    assert supports_chunked_loss(model)
    batch = torch.randint(0, 300, (3, 40), generator=torch.Generator().manual_seed(1))
    plain_loss, plain_grads = loss_and_grads(model, batch, chunked=False)
    fast_loss, fast_grads = loss_and_grads(model, batch, chunked=True)
    assert fast_loss == pytest.approx(plain_loss, rel=1e-6)
    assert plain_grads.keys() == fast_grads.keys() and len(plain_grads) > 0
    for name, g in plain_grads.items():
        torch.testing.assert_close(fast_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_chunked_loss_under_bf16_autocast_is_within_bf16_tolerance():
    from conftest import build_llama

    model = build_llama(300, initializer_range=0.2).train()
    batch = torch.randint(0, 300, (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model(input_ids=batch, labels=batch).loss.item()
        fast = causal_lm_loss(model, batch, chunked=True).item()
    fp32 = causal_lm_loss(model, batch, chunked=False).item()
    assert fast == pytest.approx(plain, rel=1e-2)
    assert fast == pytest.approx(fp32, rel=2e-2)


def test_chunked_loss_gradients_under_bf16_autocast_follow_the_plain_ones():
    """Under autocast the chunked head runs its products in bf16 (fp32 accumulation), forward and
    backward, as autocast's own head does: the gradients agree with the plain loss's within bf16
    rounding, and with a frozen head nothing is computed for it."""
    from conftest import build_llama

    model = build_llama(300, initializer_range=0.2).train()
    model.lm_head.weight.requires_grad_(False)  # tied: the embedding is frozen too, as under LoRA
    batch = torch.randint(0, 300, (2, 64), generator=torch.Generator().manual_seed(5))
    grads = {}
    for chunked in (False, True):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            causal_lm_loss(model, batch, chunked=chunked).backward()
        grads[chunked] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys() and "lm_head.weight" not in grads[True]
    for name, g in grads[False].items():
        got = grads[True][name]
        assert torch.nn.functional.cosine_similarity(got.flatten(), g.flatten(), dim=0) > 0.999, name
        assert (got - g).norm() <= 3e-2 * g.norm(), name


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_cross_entropy_with_ignored_targets_bias_and_head_gradients(chunk):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(20, 8, generator=g, requires_grad=True)
    weight = torch.randn(50, 8, generator=g, requires_grad=True)
    bias = torch.randn(50, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (20,), generator=g)
    targets[[0, 5, 6]] = -100
    ref = F.cross_entropy(F.linear(hidden, weight, bias), targets, ignore_index=-100)
    ref_grads = torch.autograd.grad(ref * 3.0, (hidden, weight, bias))
    got = ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, chunk)
    got_grads = torch.autograd.grad(got * 3.0, (hidden, weight, bias))
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert got_grads[0][[0, 5, 6]].abs().max() == 0  # ignored rows get no gradient


def test_a_lora_wrapped_head_falls_back_to_the_plain_loss():
    from conftest import build_llama

    model = peft_lora(build_llama(300).train(), ["q_proj", "lm_head"])
    assert not supports_chunked_loss(model)
    batch = torch.randint(0, 300, (2, 16))
    assert causal_lm_loss(model, batch).item() == pytest.approx(model(input_ids=batch, labels=batch).loss.item())


# ------------------------------------------------------------------------------ --train-layers

def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_train_layers_trains_only_the_top_layers(tmp_path, train_model_dirs, corpus, family, method, monkeypatch):
    import styletune.losses as losses_module
    import styletune.training as training

    seen = {}
    real = losses_module.causal_lm_loss

    def record_layer0(module, args, output):
        if torch.is_grad_enabled():
            out = output[0] if isinstance(output, tuple) else output
            seen["layer0_output_needs_grad"] = out.requires_grad

    def spy(model, batch, *args, **kw):
        if "trainable" not in seen:
            seen["trainable"] = trainable(model)
            training.layer_stack(model)[1][0].register_forward_hook(record_layer0)
        return real(model, batch, *args, **kw)

    monkeypatch.setattr(losses_module, "causal_lm_loss", spy)  # what the loop's LossOf calls
    cfg = config(tmp_path, train_model_dirs[family], corpus, method=method, lr=1e-2, max_steps=12,
                 eval_every=12, save_every=12, warmup_fraction=0.0, train_layers=1)
    result = train(cfg)
    names = seen["trainable"]
    layer_of = [re.search(r"\.(?:layers|h)\.(\d+)\.", n) for n in names]
    assert {int(m.group(1)) for m in layer_of if m} == {1}, names  # the top of 2 layers, never layer 0
    assert not any("embed" in n or "wte" in n or "wpe" in n for n in names), names
    if method == "lora":
        assert all("lora_" in n for n in names), names
    else:
        assert any("norm" in n or "ln_f" in n for n in names), names
    # Nothing below the trained layer is in the autograd graph, so backward stops above layer 0.
    assert seen["layer0_output_needs_grad"] is False
    got = losses(cfg.out)
    assert sum(got[-3:]) / 3 < 0.95 * sum(got[:3]) / 3, got
    assert math.isfinite(result.val_loss)


# ------------------------------------------------------------------------------ --compile

@pytest.mark.parametrize("family,dropout", [("llama", 0.0), ("llama", 0.2), ("gpt2", 0.0)])
def test_compiled_training_gives_the_losses_of_eager_training(tmp_path, train_model_dirs, corpus, family, dropout,
                                                              train_dtype):
    """With dropout on too: compiled layers draw their masks from torch's generator, as eager does.
    In both dtypes, within the reordering tolerance of each (see conftest.REORDER_RTOL). GPT-2 (its
    Conv1D projections) at the default dropout, which a long bf16 run compiles by default."""
    from conftest import REORDER_RTOL

    runs = {}
    for compile in (False, True):
        cfg = config(tmp_path / str(compile), train_model_dirs[family], corpus, lr=1e-2, max_steps=4,
                     eval_every=4, save_every=4, lora_dropout=dropout, compile=compile, dtype=train_dtype)
        lines = []
        result = train(cfg, echo=lines.append)
        runs[compile] = (losses(cfg.out), result.val_loss, lines)
    assert not [line for line in runs[True][2] if "torch.compile failed" in line], runs[True][2]
    assert any("compiled" in line for line in runs[True][2])
    assert any(("bf16 autocast" in line) == (train_dtype == "bfloat16") for line in runs[True][2]
               if line.startswith("training "))
    rtol = REORDER_RTOL[train_dtype]
    assert runs[True][0] == pytest.approx(runs[False][0], rel=rtol)
    assert runs[True][1] == pytest.approx(runs[False][1], rel=rtol)


def test_a_failing_compiler_falls_back_to_eager_training(tmp_path, train_model_dirs, corpus, monkeypatch):
    def broken(fn, **kw):
        def run(*args, **kwargs):
            raise RuntimeError("no C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    cfg = config(tmp_path, train_model_dirs["llama"], corpus, max_steps=3, eval_every=3, save_every=3, compile=True)
    lines = []
    result = train(cfg, echo=lines.append)
    assert [line for line in lines if "torch.compile failed (RuntimeError: no C++ compiler)" in line]
    assert result.steps == 3 and len(losses(cfg.out)) == 3


@pytest.mark.parametrize("length", [{"max_steps": 3}, {"time_budget": "2s"}])
def test_a_compiled_backward_that_fails_falls_back_to_eager_training(tmp_path, train_model_dirs, corpus,
                                                                     monkeypatch, length):
    """The backward of a compiled layer is compiled at its first call, after the forward worked: the
    step (or the time-budget probe) is undone and run again eagerly, with the same random draws."""
    real_compile = torch.compile
    wrapped = []

    def backward_breaks(fn, **kw):
        bottom = not wrapped  # layer 0, the last one backward reaches: the layers above have gradients by then
        wrapped.append(fn)

        def run(*args, **kwargs):
            out = fn(*args, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out

            def fail(grad):
                raise RuntimeError("inductor crashed compiling the backward")
            if bottom:
                hidden.register_hook(fail)
            return out
        return run

    runs = {}
    for broken in (False, True):
        monkeypatch.setattr(torch, "compile", backward_breaks if broken else real_compile)
        cfg = config(tmp_path / str(broken), train_model_dirs["llama"], corpus, eval_every=100, save_every=100,
                     lora_dropout=0.2, compile=broken, **length)
        lines = []
        result = train(cfg, echo=lines.append)
        runs[broken] = losses(cfg.out), result.steps
        warned = [line for line in lines if "torch.compile failed (RuntimeError: inductor crashed" in line]
        assert len(warned) == broken, lines
    if "max_steps" in length:  # the same draws and the same arithmetic: the same losses
        assert runs[True][1] == runs[False][1] == 3
        assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-6)
    else:
        assert runs[True][1] >= 1 and len(runs[True][0]) == runs[True][1]
