"""Plain ``vjp`` keeps no attention matrix: ComfyUI's plain-torch attention kernels run again in the backward.

On a CPU (and wherever ComfyUI does not pick PyTorch's SDPA) attention runs through the basic, split or
sub-quadratic kernel, whose autograd graph saves the (batch·heads × tokens × tokens) attention matrix of every call.
The differentiated pass saves ``q``, ``k`` and ``v`` instead and recomputes the matrix in the backward. Each test
checks that REG's step still equals the reference (plain autograd, which saves the matrices), and that no tensor the
graph saves has an attention matrix's shape, with a positive control: the same spy sees them when the recomputation
is switched off. The attention calls are seen through an ``optimized_attention_override`` of the test's own, which REG
must keep running (as it keeps another pack's).
"""

from __future__ import annotations

import logging

import pytest
import torch
from test_compatibility import Case, ReferenceREG, load_family, reg_lines, sample, with_reg
from test_weight_casts import saved_shapes


def matrix_shape(q: torch.Tensor, k: torch.Tensor, heads: int, skip_reshape: bool) -> tuple[int, int, int]:
    """The attention matrix of one call: (batch·heads, query tokens, key tokens)."""
    if skip_reshape:  # (batch, heads, tokens, head width)
        return (q.shape[0] * q.shape[1], q.shape[2], k.shape[2])
    return (q.shape[0] * heads, q.shape[1], k.shape[1])


def spied(model, matrices: set[tuple[int, int, int]]):
    """``model`` with an attention override that notes each call's attention matrix shape and runs the kernel."""

    def spy(func, q, k, v, heads, *args, **kwargs):
        matrices.add(matrix_shape(q, k, heads, kwargs.get("skip_reshape", False)))
        return func(q, k, v, heads, *args, **kwargs)

    patched = model.clone()
    options = patched.model_options.get("transformer_options", {})
    patched.model_options = {
        **patched.model_options,
        "transformer_options": {**options, "optimized_attention_override": spy},
    }
    return patched


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_attention_matrices_are_recomputed_not_saved(tiny, reg_pack, caplog, monkeypatch, family):
    from comfy.ldm.modules import attention

    assert attention.optimized_attention.__name__ == "attention_sub_quad"  # ComfyUI's choice on a CPU
    model, positive, negative, _ = load_family(tiny, family)
    case = Case(family=family)
    matrices: set[tuple[int, int, int]] = set()
    seen = saved_shapes(reg_pack, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="reg_guidance"):
        got = sample(case, with_reg(spied(model, matrices)), positive, negative)
    assert reg_lines(caplog) == []
    assert matrices and seen and not set(seen) & matrices
    want = sample(case, model.clone(), positive, negative, ReferenceREG())
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())

    traced_pass = reg_pack.submodule("nodes.traced_pass")
    monkeypatch.setattr(traced_pass, "_recomputing", lambda kernel: kernel)  # positive control: the matrices saved
    seen.clear()
    sample(case, with_reg(spied(model, matrices)), positive, negative)
    assert set(seen) & matrices


@pytest.mark.parametrize("kernel_name", ["attention_basic", "attention_sub_quad", "attention_split"])
@pytest.mark.parametrize("as_keyword", [False, True])
@pytest.mark.parametrize("copy", [False, True])
def test_a_mask_written_before_the_backward_is_caught_or_copied(reg_pack, kernel_name, as_keyword, copy):
    """The recomputation reads the mask again in the backward, so the mask is saved like any saved tensor: a write to
    it between the forward and the backward raises (copy=False, the estimator then repeats the pass copying) or does
    not reach the backward (copy=True), whose gradients then equal plain autograd's with the mask as it was."""
    from comfy.ldm.modules import attention

    traced_pass = reg_pack.submodule("nodes.traced_pass")
    kernel = getattr(attention, kernel_name)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 6, 8, generator=generator, requires_grad=True) for _ in range(3))
    mask = torch.randn(2, 6, 6, generator=generator)
    head_grad = torch.randn(2, 6, 8, generator=generator)
    want = torch.autograd.grad(kernel(q, k, v, 2, mask.clone()), (q, k, v), head_grad)

    guard = traced_pass.SavedTensorGuard([], copy=copy)
    with guard.hooks():
        recomputing = traced_pass._recomputing(kernel)
        out = recomputing(q, k, v, 2, mask=mask) if as_keyword else recomputing(q, k, v, 2, mask)
    mask.mul_(-3.0)  # not a constant shift, which softmax would ignore
    if not copy:
        with pytest.raises(traced_pass.InPlaceUpdateError):
            torch.autograd.grad(out, (q, k, v), head_grad)
        return
    got = torch.autograd.grad(out, (q, k, v), head_grad)
    for g, w in zip(got, want, strict=True):
        assert float((g - w).abs().max()) <= 1e-6 * float(w.abs().max())


def test_a_mask_made_in_inference_mode_stays_in_the_call(reg_pack):
    """A mask ComfyUI made while preparing the conditioning is an inference tensor, which autograd cannot save: the
    recomputation keeps it in the call instead, and its gradients equal plain autograd's."""
    from comfy.ldm.modules import attention

    traced_pass = reg_pack.submodule("nodes.traced_pass")
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 6, 8, generator=generator, requires_grad=True) for _ in range(3))
    plain_mask = torch.randn(2, 6, 6, generator=generator)
    with torch.inference_mode():
        mask = plain_mask.clone()
    head_grad = torch.randn(2, 6, 8, generator=generator)
    want = torch.autograd.grad(attention.attention_basic(q, k, v, 2, mask=plain_mask), (q, k, v), head_grad)
    with traced_pass.SavedTensorGuard([], copy=False).hooks():
        out = traced_pass._recomputing(attention.attention_basic)(q, k, v, 2, mask=mask)
    got = torch.autograd.grad(out, (q, k, v), head_grad)
    for g, w in zip(got, want, strict=True):
        assert float((g - w).abs().max()) <= 1e-6 * float(w.abs().max())
