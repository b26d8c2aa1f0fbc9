"""token_logprobs: values and gradients vs the naive full-logits path, dtypes, edge cases, saved memory."""

import pytest
import torch
import torch.nn.functional as F

from preftune.modeling.logprobs import token_logprobs

N, H, V = 37, 16, 50


def naive(hidden, weight, labels, bias=None, softcap=None):
    z = hidden @ weight.T
    if bias is not None:
        z = z + bias
    z = z.float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return F.log_softmax(z, dim=-1).gather(1, labels[:, None]).squeeze(1)


def make(n=N, h=H, v=V, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g, dtype=dtype) * 0.5).requires_grad_()
    bias = torch.randn(v, generator=g, dtype=dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    grad_out = torch.randn(n, generator=g, dtype=dtype)
    return hidden, weight, bias, labels, grad_out


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 7, 16, 37, 1024, 0, -1])
def test_matches_naive(chunk_size, use_bias, softcap):
    hidden, weight, bias, labels, grad_out = make()
    b = bias if use_bias else None
    inputs = (hidden, weight, bias) if use_bias else (hidden, weight)
    ref = naive(hidden, weight, labels, b, softcap)
    ref_grads = torch.autograd.grad(ref, inputs, grad_out)
    out = token_logprobs(hidden, weight, labels, b, chunk_size=chunk_size, softcap=softcap)
    grads = torch.autograd.grad(out, inputs, grad_out)
    assert out.dtype == torch.float32 and out.shape == (N,)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_no_grad_saves_nothing():
    hidden, weight, bias, labels, _ = make()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.no_grad():
            out = token_logprobs(hidden, weight, labels, bias, chunk_size=8)
        frozen = token_logprobs(hidden.detach(), weight.detach(), labels, chunk_size=8)
    assert saved == [] and not out.requires_grad and not frozen.requires_grad
    torch.testing.assert_close(out, naive(hidden, weight, labels, bias).detach(), atol=1e-5, rtol=1e-5)


def test_empty():
    hidden, weight, bias, labels, _ = make(n=0)
    out = token_logprobs(hidden, weight, labels, bias, chunk_size=4)
    assert out.shape == (0,) and out.dtype == torch.float32
    out.sum().backward()
    assert hidden.grad.shape == (0, H)
    assert torch.equal(weight.grad, torch.zeros_like(weight)) and torch.equal(
        bias.grad, torch.zeros_like(bias)
    )


def test_frozen_weight_and_frozen_hidden():
    hidden, weight, _, labels, grad_out = make()
    weight.requires_grad_(False)  # reference model / LoRA: only hidden gets a gradient
    out = token_logprobs(hidden, weight, labels, chunk_size=8)
    (g,) = torch.autograd.grad(out, hidden, grad_out)
    (r,) = torch.autograd.grad(naive(hidden, weight, labels), hidden, grad_out)
    torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
    weight.requires_grad_(True)
    out = token_logprobs(hidden.detach(), weight, labels, chunk_size=8)
    (g,) = torch.autograd.grad(out, weight, grad_out)
    (r,) = torch.autograd.grad(naive(hidden.detach(), weight, labels), weight, grad_out)
    torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("non_leaf", [False, True])
def test_tied_weight_gets_summed_gradient(non_leaf):
    def loss(fn):
        torch.manual_seed(1)
        emb = torch.nn.Embedding(V, H)
        ids, labels = torch.randint(0, V, (N,)), torch.randint(0, V, (N,))
        weight = emb.weight * 1.0 if non_leaf else emb.weight
        hidden = torch.tanh(emb(ids))  # the same weight is the input embedding and the LM head
        fn(hidden, weight, labels).sum().backward()
        return emb.weight.grad

    got = loss(lambda h, w, y: token_logprobs(h, w, y, chunk_size=8))
    torch.testing.assert_close(got, loss(naive), atol=1e-5, rtol=1e-5)


def test_bf16():
    hidden, weight, bias, labels, grad_out = make()
    ref = token_logprobs(hidden, weight, labels, bias, chunk_size=8)
    ref_grads = torch.autograd.grad(ref, (hidden, weight, bias), grad_out)
    low = [t.detach().bfloat16().requires_grad_() for t in (hidden, weight, bias)]
    out = token_logprobs(low[0], low[1], labels, low[2], chunk_size=8)
    grads = torch.autograd.grad(out, low, grad_out)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=0.1, rtol=0.05)
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), r, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_gradcheck(softcap):
    hidden, weight, bias, labels, _ = (
        t.detach().double() if t.is_floating_point() else t for t in make(5, 3, 7)
    )
    inputs = tuple(t.requires_grad_() for t in (hidden, weight, bias))

    def fn(h, w, b):
        return token_logprobs(h, w, labels, b, chunk_size=2, softcap=softcap)

    assert torch.autograd.gradcheck(fn, inputs)


def test_graph_keeps_no_token_by_vocab_tensor():
    n, h, v, chunk = 4096, 8, 32000, 1024
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    labels = torch.randint(0, v, (n,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        token_logprobs(hidden, weight, labels, chunk_size=chunk)
    assert sorted(saved) == sorted([(n, h), (v, h), (n,), (n,)])  # hidden, weight, labels, logsumexp
