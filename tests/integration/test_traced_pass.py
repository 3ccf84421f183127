"""The differentiated pass's switches (nodes/traced_pass.py) on small torch modules, inside the real ComfyUI.

Each test compares with an independent reference (plain autograd on an out-of-place twin of the network) or asserts
the exact error or count the rule promises.
"""

from __future__ import annotations

import pytest
import torch


class InPlaceBlock(torch.nn.Module):
    """A residual block that updates its input in place after a layer saved it, as Flux's blocks do."""

    def __init__(self, width: int, in_place: bool = True) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.lin = torch.nn.Linear(width, width)
        self.in_place = in_place

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        update = self.lin(torch.tanh(self.norm(x))) * scale
        if self.in_place:
            x += update
            return x
        return x + update


class Network(torch.nn.Module):
    def __init__(self, width: int = 6, depth: int = 3, in_place: bool = True) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(InPlaceBlock(width, in_place) for _ in range(depth))
        self.head = torch.nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(x)
        scale = torch.full((1,), 0.7, dtype=x.dtype)
        for block in self.blocks:
            h = block(h, scale)
        return h * x


def _twins(depth: int = 3) -> tuple[Network, Network]:
    torch.manual_seed(0)
    in_place = Network(depth=depth).double()
    reference = Network(depth=depth, in_place=False).double()
    reference.load_state_dict(in_place.state_dict())
    for net in (in_place, reference):
        net.requires_grad_(False)
    return in_place, reference


def _column_sums(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    leaf = x.detach().clone().requires_grad_(True)
    out = net(leaf)
    (grad,) = torch.autograd.grad(out, leaf, torch.ones_like(out))
    return grad


@pytest.mark.parametrize("checkpoint", [False, True], ids=["plain", "checkpointed"])
def test_in_place_updates_give_the_reference_gradient(reg_pack, checkpoint):
    tp = reg_pack.submodule("nodes.traced_pass")
    net, reference = _twins()
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        _column_sums(net, x)  # what a plain traced pass meets
    with pytest.raises(tp.InPlaceUpdateError):  # the guard without copies notices it the same way
        with tp.TracedPass(net, net.parameters(), checkpoint=checkpoint, copy=False):
            _column_sums(net, x)
    with tp.TracedPass(net, net.parameters(), checkpoint=checkpoint, copy=True) as traced:
        grad = _column_sums(net, x)
        traced.check()
    torch.testing.assert_close(grad, _column_sums(reference, x), rtol=1e-12, atol=1e-12)
    with tp.TracedPass(reference, reference.parameters(), checkpoint=checkpoint, copy=False):
        torch.testing.assert_close(_column_sums(reference, x), grad, rtol=1e-12, atol=1e-12)


def test_checkpointing_saves_only_block_inputs(reg_pack):
    """Per-block recomputation: the forward keeps no activation inside the blocks (the guard copies none of them),
    while the plain traced pass saves several per block."""
    tp = reg_pack.submodule("nodes.traced_pass")
    net, _ = _twins(depth=4)
    x = torch.randn(1, 5, 6, dtype=torch.float64)
    sizes = {}
    for checkpoint in (False, True):
        with tp.TracedPass(net, net.parameters(), checkpoint=checkpoint, copy=True) as traced:
            leaf = x.clone().requires_grad_(True)
            out = net(leaf)
            sizes[checkpoint] = traced.guard.saved_bytes
            del out, leaf
    activation = x.numel() * x.element_size()
    assert sizes[False] >= 4 * 2 * activation  # each block saves at least its norm's input and its tanh's output
    assert sizes[True] < 3 * activation  # only what lies outside the blocks: the final product's two factors


def test_checkpoint_units_follow_the_block_lists(reg_pack):
    tp = reg_pack.submodule("nodes.traced_pass")
    net = Network(depth=3)
    assert tp.checkpoint_units(net) == list(net.blocks)

    class Stage(torch.nn.Module):  # a block holding a list of blocks, like a UNet SpatialTransformer
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(6, 6)
            self.layers = torch.nn.ModuleList(InPlaceBlock(6) for _ in range(2))

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stages = torch.nn.ModuleList([Stage(), torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.SiLU())])

    outer = Outer()
    assert tp.checkpoint_units(outer) == [*outer.stages[0].layers, outer.stages[1][0]]


def test_a_parameter_overwritten_before_the_backward_is_an_error(reg_pack):
    tp = reg_pack.submodule("nodes.traced_pass")
    lin = torch.nn.Linear(3, 3).double().requires_grad_(False)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    with tp.TracedPass(lin, lin.parameters(), checkpoint=False, copy=True):
        out = torch.tanh(lin(x)).sum()
        with torch.no_grad():
            lin.weight.mul_(2)  # e.g. a reused cast buffer
        with pytest.raises(tp.InPlaceUpdateError, match="written before the backward"):
            torch.autograd.grad(out, x)


def test_a_tensor_saved_by_several_ops_is_copied_once(reg_pack):
    tp = reg_pack.submodule("nodes.traced_pass")
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(8, 8, dtype=torch.float64)
    guard = tp.SavedTensorGuard([weight], copy=True)
    with guard.hooks():
        h = torch.sin(x)  # saves x
        outs = [torch.sin(h), torch.cos(h), torch.sin(h) @ weight]  # save h three times, and the weight
    assert guard.saved_bytes == 2 * h.numel() * h.element_size()  # x, and h once; the weight is never copied
    (grad,) = torch.autograd.grad(sum(o.sum() for o in outs), x)
    torch.testing.assert_close(grad, torch.autograd.functional.vjp(lambda t: _three(t, weight), x)[1])


@pytest.mark.parametrize("ending", ["dropped", "over budget", "overwritten"])
def test_a_graph_that_never_finishes_its_backward_is_freed(reg_pack, ending):
    """A pass whose graph is dropped without a backward (an interrupt), stopped over its budget, or whose backward
    finds an overwritten tensor, frees every tensor it saved: nothing it saved may hold its own grad_fn (autograd's
    C++ cycle that Python's collector cannot see, a whole graph lost per failed pass)."""
    import gc
    import weakref

    tp = reg_pack.submodule("nodes.traced_pass")
    x = torch.randn(64, dtype=torch.float64, requires_grad=True)
    guard = tp.SavedTensorGuard([], copy=False, budget=5 * 64 * 8 if ending == "over budget" else None)
    kept: list[weakref.ref] = []  # what the graph holds: the tensors the guard's pack hook returned
    pack = guard._pack

    def recording_pack(tensor):
        packed = pack(tensor)
        kept.append(weakref.ref(packed[0]))
        return packed

    guard._pack = recording_pack

    def attempt() -> None:
        with guard.hooks():
            h = x
            for _ in range(8):
                h = torch.tanh(h) * 2  # tanh saves its output
        if ending == "overwritten":
            with torch.no_grad():
                kept[-1]().add_(1)  # the last tanh output, written before the backward
            torch.autograd.grad(h.sum(), x)

    expected = {"dropped": None, "over budget": tp.GraphTooLargeError, "overwritten": tp.InPlaceUpdateError}[ending]
    if expected is None:
        attempt()
    else:
        with pytest.raises(expected):
            attempt()
    gc.collect()
    assert len(kept) == (5 if ending == "over budget" else 8)
    assert all(ref() is None for ref in kept)


def test_the_graph_size_counts_each_storage_once(reg_pack):
    """Ops save views of one activation (reshapes, transposes): the budget counts the memory they keep alive once."""
    tp = reg_pack.submodule("nodes.traced_pass")
    x = torch.randn(32, dtype=torch.float64, requires_grad=True)
    guard = tp.SavedTensorGuard([], copy=False)
    with guard.hooks():
        h = torch.sin(x)  # saves x
        outs = [torch.sin(h.view(4, 8)), torch.cos(h.view(8, 4)), torch.sin(h.view(2, 16).t())]  # three views of h
    assert guard.saved_bytes == 2 * 32 * 8
    (grad,) = torch.autograd.grad(sum(o.sum() for o in outs), x)
    want = torch.cos(x) * (torch.cos(torch.sin(x)) * 2 - torch.sin(torch.sin(x)))
    torch.testing.assert_close(grad, want)


def _three(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    h = torch.sin(x)
    return torch.sin(h).sum() + torch.cos(h).sum() + (torch.sin(h) @ weight).sum()


def test_the_audit_names_layers_that_drop_the_gradient(reg_pack):
    tp = reg_pack.submodule("nodes.traced_pass")

    class Quantised(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x.detach())  # the input quantised without grad

    class DtypeOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)

        def forward(self, t, like):  # uses ``like`` only for its dtype, as Qwen-Image's timestep embedding
            return self.lin(t.to(like.dtype))

    class Net(torch.nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.layer, self.embed = layer, DtypeOnly()

        def forward(self, x):
            return self.layer(x) + self.embed(torch.ones(2, 3), x)

    x = torch.randn(2, 3, requires_grad=True)
    for layer, dropped in ((Quantised(3, 3), "Quantised"), (torch.nn.Linear(3, 3), None)):
        net = Net(layer).requires_grad_(False)
        with tp.TracedPass(net, net.parameters(), checkpoint=False, copy=False) as traced:
            net(x)
            if dropped is None:
                traced.check()
            else:
                with pytest.raises(tp.NoGraphError, match=dropped):
                    traced.check()


def test_everything_switched_is_restored_on_error(reg_pack):
    import comfy.model_management
    import comfy.ops

    tp = reg_pack.submodule("nodes.traced_pass")
    net, _ = _twins()
    net.head.weight.requires_grad_(True)  # a model loaded outside inference mode: trainable weights
    cast = comfy.ops.cast_bias_weight
    had_flag = hasattr(comfy.model_management, "in_training")
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        with tp.TracedPass(net, net.parameters(), checkpoint=True, copy=True):
            if had_flag:
                assert comfy.model_management.in_training is True
            assert all("forward" in block.__dict__ for block in net.blocks)
            assert not net.head.weight.requires_grad and comfy.ops.cast_bias_weight is not cast
            raise comfy.model_management.InterruptProcessingException()
    if had_flag:
        assert comfy.model_management.in_training is False
    assert net.head.weight.requires_grad and comfy.ops.cast_bias_weight is cast
    net.head.weight.requires_grad_(False)
    assert not any("forward" in block.__dict__ for block in net.blocks)
    assert torch.is_inference_mode_enabled() is False
    # no saved-tensor hook is left behind: a plain in-place failure is torch's own error again
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        _column_sums(net, torch.randn(1, 2, 6, dtype=torch.float64))


def test_make_differentiable_replaces_only_plain_tensors_on_the_compute_device(reg_pack):
    tp = reg_pack.submodule("nodes.traced_pass")
    with torch.inference_mode():
        lin = torch.nn.Linear(3, 3)
        lin.register_buffer("table", torch.ones(2))
        other = torch.nn.Linear(3, 3, device="meta")  # stands for weights ComfyUI keeps on another device
    assert lin.weight.is_inference()
    assert tp.make_differentiable([lin, other], torch.device("cpu")) == 3
    assert not lin.weight.is_inference() and not lin.table.is_inference()
    assert not lin.weight.requires_grad and isinstance(lin.weight, torch.nn.Parameter)
    assert other.weight.device.type == "meta"
    assert tp.make_differentiable([lin], torch.device("cpu")) == 0


def test_known_failures_are_named_and_others_are_not(reg_pack):
    tp = reg_pack.submodule("nodes.traced_pass")
    kernel = RuntimeError(
        "Trying to backward through comfy_kitchen.apply_rope.default but no autograd formula was registered"
    )
    assert tp.known_autograd_failure(kernel).startswith("Trying to backward")
    assert tp.known_autograd_failure(tp.NoGraphError("no graph")) == "no graph"
    assert tp.known_autograd_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)")) is None
    assert tp.known_autograd_failure(ValueError("modified by an inplace operation")) is None
    no_formula = RuntimeError("the derivative for '_scaled_mm' is not implemented.")
    assert tp.known_autograd_failure(no_formula) == str(no_formula)
    dtype = RuntimeError("addmm: computation on CPU is not implemented for Float8_e4m3fn")  # a bug, not autograd's
    assert tp.known_autograd_failure(dtype) is None


def test_the_in_place_retry_releases_the_failed_pass_first(reg_pack):
    """The repeat with copies runs after the failed attempt (and the graph its traceback holds) is released."""
    import weakref

    traced = reg_pack.submodule("nodes.estimators.traced").Traced()
    tp = reg_pack.submodule("nodes.traced_pass")
    first: list[weakref.ref] = []

    def attempt() -> bool:
        if not first:
            graph = torch.ones(4, requires_grad=True) * 2  # the failed pass's graph, a local of its frame
            first.append(weakref.ref(graph))
            raise tp.InPlaceUpdateError("a tensor saved for the backward was written before the backward read it")
        return first[0]() is None

    assert traced.retrying_in_place(attempt) is True
    assert traced.copy is True


def test_make_differentiable_copies_one_tensor_at_a_time_and_rolls_back_on_failure(reg_pack, monkeypatch):
    """The peak is one extra weight, not a second model: when the second copy is made, the first is installed.
    A failure (out of memory) puts every replaced tensor back, so the shared model is exactly as it was."""
    tp = reg_pack.submodule("nodes.traced_pass")
    with torch.inference_mode():
        net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    originals = [net[0].weight, net[0].bias, net[1].weight, net[1].bias]
    clone = torch.Tensor.clone
    seen: list[bool] = []

    def failing_clone(tensor, *args, **kwargs):
        seen.append(not net[0].weight.is_inference())  # is the first copy already installed?
        if len(seen) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return clone(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "clone", failing_clone)
    with pytest.raises(torch.OutOfMemoryError):
        tp.make_differentiable([net], torch.device("cpu"))
    monkeypatch.undo()
    assert seen == [False, True, True]
    restored = [net[0].weight, net[0].bias, net[1].weight, net[1].bias]
    assert all(a is b for a, b in zip(restored, originals, strict=True))


def test_a_recomputed_block_must_reproduce_its_forward(reg_pack):
    """A block whose output depends on state that changed after its forward (ComfyUI's UNet rewrites the per-block
    transformer_options it passes positionally) is a named error, never a silently wrong gradient. The options dict
    a block got is frozen as it was, so the usual case recomputes exactly."""
    tp = reg_pack.submodule("nodes.traced_pass")

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(6, 6).double().requires_grad_(False)
            self.gain = 1.0

        def forward(self, x, options):
            return self.lin(x) * options["gain"] * self.gain

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([Block(), Block()])

        def forward(self, x):
            options = {}
            for i, block in enumerate(self.blocks):
                options["gain"] = 1.0 + i  # rewritten in place, as the UNet loop rewrites "block"
                x = block(x, options)
            return x

    net = Net()
    x = torch.randn(2, 6, dtype=torch.float64)
    with tp.TracedPass(net, net.parameters(), checkpoint=True, copy=False):
        recomputed = _column_sums(net, x)
    torch.testing.assert_close(recomputed, _column_sums(net, x), rtol=1e-12, atol=1e-12)
    with pytest.raises(tp.RecomputeMismatchError):
        with tp.TracedPass(net, net.parameters(), checkpoint=True, copy=False):
            leaf = x.clone().requires_grad_(True)
            out = net(leaf)
            net.blocks[0].gain = 3.0  # state the recomputation cannot know
            torch.autograd.grad(out.sum(), leaf)
