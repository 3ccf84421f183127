"""The differentiated conditional pass: everything REG switches on for it, and only for it.

ComfyUI samples inside ``torch.inference_mode`` with weights that were loaded, patched or cast there, and today's
models run custom kernels without a backward (``comfy_kitchen`` RoPE, fused norms) and update residual streams in
place after the tensors were saved for backward. For the one pass whose Jacobian REG needs (``M = a(σ)·∇_x Σ D_c``,
README, "The maths"), :class:`TracedPass` switches, and always restores, also on error and interrupt:

- inference mode off and autograd on (for the input only: weights never require grad meanwhile);
- the kernels (:func:`plain_kernels`): ComfyUI's own ``comfy.model_management.in_training`` flag, which makes the
  models take their plain-torch code paths (the custom kernels have no autograd formula), and attention through a
  kernel with a backward (``optimized_attention_override``: sage, flash and int8 attention have none). The other
  passes of the step use the same kernels, so ``D_c`` and ``D_u`` come from one numeric path. In the plain graph,
  ComfyUI's plain-torch kernels (basic, split, sub-quadratic: its choice on a CPU) recompute their attention matrix in
  the backward instead of saving one per call (:class:`_RecomputedAttention`);
- a saved-tensor guard (:class:`SavedTensorGuard`) that notices tensors overwritten before the backward read them
  (in-place updates, reused cast buffers) and, for networks that do that, gives autograd private copies; a weight
  that ComfyUI casts, dequantises or streams in for one layer is not kept at all: the graph keeps how to cast it
  again (:class:`WeightRecasts`), and the backward makes it again, one layer at a time;
- a gradient audit (:class:`GradientAudit`) that notices layers that silently drop out of the graph (quantised
  layers, detached outputs), so M is never computed from a partial Jacobian without a word;
- optionally, per-block recomputation (:class:`BlockCheckpointing`) that bounds the saved activations.

The untraced passes see none of this but the kernels.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import comfy.model_management
import torch

PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


class NoGraphError(RuntimeError):
    """The conditional pass cannot give an exact Jacobian (no graph, a partial graph, or an overwritten tensor)."""


# Messages of the autograd failures a differentiated pass through a ComfyUI model can meet and REG can name (each: the
# phrases that must all appear); any other error is a real bug and surfaces (see :func:`known_autograd_failure`).
KNOWN_AUTOGRAD_FAILURES = (
    ("no autograd formula",),
    ("modified by an inplace operation",),
    ("inference tensors cannot be saved for backward",),
    ("does not require grad and does not have a grad_fn",),
    ("derivative for", "is not implemented"),  # torch: "the derivative for 'op' is not implemented"
)


def known_autograd_failure(err: BaseException) -> str | None:
    """The first line of ``err`` when it is an autograd failure REG falls back from, else None."""
    if isinstance(err, NoGraphError):
        return str(err)
    if isinstance(err, (RuntimeError, NotImplementedError)):
        text = str(err)
        lower = text.lower()
        if any(all(phrase in lower for phrase in phrases) for phrases in KNOWN_AUTOGRAD_FAILURES):
            return text.splitlines()[0] if text else type(err).__name__
    return None


def differentiable_modules(model: torch.nn.Module, conds: list[Any]) -> list[torch.nn.Module]:
    """The diffusion model plus the ControlNet/T2I-adapter models attached to the conditioning."""
    modules = [model]
    seen: set[int] = set()
    for cond_list in conds:
        for cond in cond_list or []:
            control = cond.get("control") if isinstance(cond, dict) else None
            while control is not None and id(control) not in seen:
                seen.add(id(control))
                modules.extend(patcher.model for patcher in control.get_models())
                control = getattr(control, "previous_controlnet", None)
    return modules


def make_differentiable(modules: Iterable[torch.nn.Module], device: torch.device) -> int:
    """Replace inference-mode parameters and buffers on the compute ``device`` by ordinary copies; return the count.

    ComfyUI loads and patches weights inside ``torch.inference_mode``; such tensors cannot be saved for backward. The
    rule for weights ComfyUI casts or streams (offloaded layers, pinned host memory, DynamicVRAM): a tensor that is
    not on the compute device is copied to it by ComfyUI's cast at every forward, and inside the traced pass that copy
    is an ordinary tensor, so it is left alone — pinned and streamed buffers are never swapped for clones. Tensor
    subclasses (quantised weights) are never replaced either: a layer that saves one for backward fails with a named
    autograd error, and REG falls back. Values are unchanged and ``requires_grad`` stays False. One tensor is copied
    and installed at a time (the peak is one weight, not a second model); a failure puts every replaced tensor back,
    so the shared model is exactly as it was.
    """
    replaced: list[tuple[dict[str, Any], str, Any]] = []
    try:
        with torch.inference_mode(False), torch.no_grad():
            for root in modules:
                for module in root.modules():
                    for table, wrap in ((module._parameters, True), (module._buffers, False)):
                        for name, tensor in list(table.items()):
                            if tensor is None or type(tensor) not in PLAIN_TENSORS:
                                continue  # tensor subclasses (quantised weights) stay as they are
                            if not tensor.is_inference() or tensor.device != device:
                                continue
                            copy = tensor.clone()
                            table[name] = torch.nn.Parameter(copy, requires_grad=False) if wrap else copy
                            replaced.append((table, name, tensor))
    except BaseException:
        for table, name, original in reversed(replaced):
            table[name] = original
        raise
    return len(replaced)


class InPlaceUpdateError(NoGraphError):
    """A tensor saved for the backward was written before the backward read it (an in-place update, a reused buffer)."""


class GraphTooLargeError(RuntimeError):
    """The graph being recorded outgrew the memory budget of its pass (the pass stops there, nothing is kept)."""


class RecomputeMismatchError(NoGraphError):
    """A block recomputed for the backward did not reproduce its forward output."""


@dataclass
class Recast:
    """How to make one per-layer weight copy again: ComfyUI's ``cast_bias_weight`` for the same layer and arguments."""

    cast: Callable[..., Any]
    layer: torch.nn.Module
    args: tuple
    kwargs: dict
    index: int  # 0: the weight, 1: the bias

    def make(self) -> torch.Tensor:
        return self.cast(self.layer, *self.args, **self.kwargs)[self.index]


@dataclass
class RecastView:
    """A saved tensor that is (a view of) a per-layer weight copy: its recipe and where it sits in the copy."""

    recast: Recast
    size: torch.Size
    stride: tuple[int, ...]
    offset: int  # storage offset relative to the copy's

    def make(self) -> torch.Tensor:
        base = self.recast.make()
        return base.as_strided(self.size, self.stride, base.storage_offset() + self.offset)


class WeightRecasts:
    """The weights ComfyUI casts, dequantises or streams in per layer (``comfy.ops.cast_bias_weight``) during the
    traced pass, and how to make each again.

    While :meth:`recording`, every copy ``cast_bias_weight`` returns is noted with its call (the layer input replaced
    by an empty tensor of its dtype and device, which is all the cast reads from it, and without async offload). A
    saved tensor that lies in such a copy, untouched since the cast (same version), is then saved as a
    :class:`RecastView` instead of the copy: the graph holds no weight-sized tensor. A copy in a per-stream buffer that
    the next layer reuses is matched to the latest cast into it.
    """

    def __init__(self) -> None:
        self._casts: dict[int, list[tuple[weakref.ref, int, Recast]]] = {}

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Note every cast ComfyUI makes meanwhile (``comfy.ops.cast_bias_weight`` is restored in ``finally``)."""
        import comfy.ops

        original = comfy.ops.cast_bias_weight

        def recording_cast(layer: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            result = original(layer, *args, **kwargs)
            self._note(original, layer, args, kwargs, result)
            return result

        comfy.ops.cast_bias_weight = recording_cast
        try:
            yield
        finally:
            comfy.ops.cast_bias_weight = original

    def _note(self, cast: Callable, layer: torch.nn.Module, args: tuple, kwargs: dict, result: tuple) -> None:
        light_args = tuple(_stand_in(a) for a in args)
        light_kwargs = {k: _stand_in(v) for k, v in kwargs.items()}
        if "offloadable" in light_kwargs:
            light_kwargs["offloadable"] = False
        for index, tensor in enumerate(result[:2]):
            own = getattr(layer, ("weight", "bias")[index], None)
            if type(tensor) is not torch.Tensor or tensor is own:  # no copy (or none at all): nothing to recast
                continue
            entry = (weakref.ref(tensor), tensor._version, Recast(cast, layer, light_args, light_kwargs, index))
            self._casts.setdefault(_storage(tensor), []).append(entry)

    def view_of(self, saved: torch.Tensor) -> RecastView | None:
        """The recipe for ``saved`` when it lies in a noted, untouched weight copy; else None."""
        if type(saved) is not torch.Tensor or saved.requires_grad:
            return None
        for ref, version, recast in reversed(self._casts.get(_storage(saved), ())):
            copy = ref()
            if copy is None or copy._version != version or saved._version != version:
                continue
            start = copy.data_ptr()
            if start <= saved.data_ptr() < start + copy.numel() * copy.element_size():
                offset = saved.storage_offset() - copy.storage_offset()
                return RecastView(recast, saved.size(), saved.stride(), offset)
        return None

    def release(self) -> None:
        self._casts.clear()


def _stand_in(value: Any) -> Any:
    """An empty tensor of the same dtype and device for a plain tensor argument (the cast reads only those)."""
    if type(value) is torch.Tensor:
        return torch.empty(0, dtype=value.dtype, device=value.device)
    return value


class SavedTensorGuard:
    """``saved_tensors_hooks`` that make sure the backward reads what the forward saved, never something overwritten.

    Two modes. ``copy=False``, how every exact estimator starts: tensors are saved as they are (no cost) and each
    one's version is checked when the backward reads it, as autograd itself would; a tensor written in between raises
    :class:`InPlaceUpdateError`, and the estimator repeats the pass with ``copy=True`` for the rest of the run.
    ``copy=True``, for networks that update residual streams in place after saving them (Flux, Wan, Qwen-Image, …):
    a saved tensor that depends on the input (it requires grad) or that ComfyUI may overwrite before the backward (a
    weight cast into a shared per-stream buffer, any other non-parameter tensor) is saved as a private copy, made once
    per tensor version and shared by every op that saves it. A model parameter, or a quantised weight (a view of one:
    it shares the layer's quantised data), is always saved as is (copying it would duplicate the weights) and
    version-checked, and a per-layer weight copy is saved as its recipe
    (:class:`WeightRecasts`). ``saved_bytes`` counts the storages the graph keeps alive otherwise, each once (ops save
    many views of one activation), in either mode: the size of the graph. During the forward a counted storage stays
    alive with the graph, so its address is not reused while the count grows. With a ``budget`` (bytes), a graph that
    outgrows it stops the forward with :class:`GraphTooLargeError` before it can exhaust the device's memory.
    """

    def __init__(self, parameters: Iterable[torch.Tensor], *, copy: bool, budget: float | None = None) -> None:
        self._parameter_storages = {_storage(p) for p in parameters} - {None}
        self.recasts = WeightRecasts()
        self.copy = copy
        self.budget = budget
        self._seen: dict[int, tuple[weakref.ref, int, weakref.ref | None]] = {}
        self._counted: set[int] = set()
        self.saved_bytes = 0

    def _count(self, tensor: torch.Tensor) -> None:
        storage = _storage(tensor)
        if storage is None:
            self.saved_bytes += tensor.numel() * tensor.element_size()
        elif storage not in self._counted:
            self._counted.add(storage)
            self.saved_bytes += tensor.untyped_storage().nbytes()
        if self.budget is not None and self.saved_bytes > self.budget:
            raise GraphTooLargeError(f"the graph outgrew {self.budget / 1e9:.2f} GB")

    def _pack(self, tensor: torch.Tensor) -> tuple[torch.Tensor, int | None] | RecastView:
        if not tensor.requires_grad and (_storage(tensor) in self._parameter_storages or _quantized(tensor)):
            return tensor, tensor._version
        recast = self.recasts.view_of(tensor)
        if recast is not None:
            return recast
        key = id(tensor)
        seen = self._seen.get(key)
        fresh = seen is None or seen[0]() is not tensor or seen[1] != tensor._version
        if not self.copy:
            if fresh:
                self._count(tensor)
                self._seen[key] = (weakref.ref(tensor), tensor._version, None)
            # detached (same storage and version counter): a saved output holding its own grad_fn would be a C++
            # reference cycle that no collector frees, leaking the graph of any pass that ends without its backward
            return tensor.detach(), tensor._version
        copy = None if fresh or seen[2] is None else seen[2]()
        if copy is None:
            copy = tensor.detach().clone()
            self._count(copy)
            self._seen[key] = (weakref.ref(tensor), tensor._version, weakref.ref(copy))
        return copy, None

    @staticmethod
    def _unpack(packed: tuple[torch.Tensor, int | None] | RecastView) -> torch.Tensor:
        if isinstance(packed, RecastView):
            return packed.make()
        tensor, version = packed
        if version is not None and tensor._version != version:
            raise InPlaceUpdateError("a tensor saved for the backward was written before the backward read it")
        return tensor

    def hooks(self) -> contextlib.AbstractContextManager:
        """The context in which the differentiated ops are recorded.

        The hooks are bookkeeping, never part of the model: under a compiled model (TorchCompileModel) they stay out
        of torch.compile, which would otherwise compile them as frames of their own, once per guard they change.
        """
        pack, unpack = torch.compiler.disable(self._pack), torch.compiler.disable(self._unpack)
        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)

    def release(self) -> None:
        """Drop the bookkeeping (the graph keeps what it saved, recipes included)."""
        self._seen.clear()
        self._counted.clear()
        self.recasts.release()


def _quantized(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a quantised weight (comfy_kitchen's ``QuantizedTensor``, or a view of one)."""
    return type(tensor) not in PLAIN_TENSORS and hasattr(tensor, "_layout_cls")


def _storage(tensor: torch.Tensor) -> int | None:
    """The address of a tensor's storage; None for tensors without one (meta tensors, wrapper subclasses)."""
    if tensor.device.type == "meta" or type(tensor) not in PLAIN_TENSORS:
        return None
    return tensor.untyped_storage().data_ptr()


class GradientAudit:
    """A global module forward hook that records layers whose output lost the gradient their input carried.

    Checked: every layer with weights of its own (linear, convolution, norm, quantised linear) and the network
    itself.
    With ``D = x − σ·F(x)`` the denoised output keeps a gradient through ``x`` even when the network ``F`` is cut from
    the graph (quantised layers whose input is quantised without grad, a cache, a kernel without backward), so M would
    silently come from a partial Jacobian (``M = a·𝟙`` when the whole network is cut). Works for every model: it does
    not rely on a model calling ComfyUI's DIFFUSION_MODEL wrapper.
    """

    def __init__(self, network: torch.nn.Module) -> None:
        self.network = network
        self.dropped: list[str] = []
        self.paused = 0  # > 0 while a checkpointed block runs without graph on purpose

    def _hook(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        if self.paused or not isinstance(output, torch.Tensor) or not output.is_floating_point():
            return
        if module is not self.network and not any(p is not None for p in module._parameters.values()):
            return  # containers may take an input only for its dtype or shape (Qwen-Image's timestep embedding)
        if output.requires_grad or not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return
        if len(self.dropped) < 8:
            self.dropped.append(type(module).__name__)
        else:
            self.dropped[-1] = "…"

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        handle = torch.nn.modules.module.register_module_forward_hook(self._hook)
        try:
            yield
        finally:
            handle.remove()

    def check(self) -> None:
        """Raise :class:`NoGraphError` naming the layers when any dropped the gradient."""
        if self.dropped:
            names = ", ".join(dict.fromkeys(self.dropped))
            raise NoGraphError(f"layers of the network drop the gradient ({names}): the Jacobian would be partial")


def checkpoint_units(network: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks whose activations :class:`BlockCheckpointing` recomputes: the network's block lists.

    Every ``nn.ModuleList`` directly under the network (Flux ``double_blocks``/``single_blocks``, MMDiT
    ``joint_blocks``, Wan ``blocks``, Qwen-Image ``transformer_blocks``, UNet ``input_blocks``/``output_blocks``);
    sequential containers among them, and sequential subclasses directly under the network (UNet ``middle_block``),
    contribute their layers, because ComfyUI's UNet iterates those layers instead of calling the container; a block
    that holds a list of several blocks itself (a UNet SpatialTransformer's transformer layers) contributes those, so
    that "one block" stays small (the layers around them keep their graph: a few activations).
    """
    units: list[torch.nn.Module] = []

    def add(module: torch.nn.Module) -> None:
        inner = [c for c in module.children() if isinstance(c, torch.nn.ModuleList) and len(c) > 1]
        if isinstance(module, torch.nn.Sequential):
            for child in module:
                add(child)
        elif inner:
            for block_list in inner:  # e.g. the transformer layers of a UNet's SpatialTransformer (10 in SDXL)
                for element in block_list:
                    add(element)
        elif any(True for _ in module.parameters()):
            units.append(module)

    for child in network.children():
        if isinstance(child, torch.nn.ModuleList):
            for element in child:
                add(element)
        elif isinstance(child, torch.nn.Sequential) and type(child) is not torch.nn.Sequential:
            add(child)
    return units


class _Recompute(torch.autograd.Function):
    """One block as a single autograd node: no activations saved in the forward, recomputed in the backward.

    The block runs on private copies of its inputs (blocks of today's models update their inputs in place); the
    inputs are kept as the guard keeps saved tensors (by reference with a version check, or as copies in its copy
    mode), and the recomputation runs under the pass's saved-tensor guard and with the pass's kernels still on (the
    whole backward is inside :class:`TracedPass`). The recomputation must give the forward's output: a fingerprint
    of each output (its sum and sum of squares) is compared, and a mismatch raises :class:`RecomputeMismatchError`.
    Non-tensor outputs (e.g. a ``None`` context of a last MMDiT block) pass through.
    """

    @staticmethod
    def forward(ctx, call: Callable[[list[torch.Tensor]], Any], traced: TracedPass, *tensors: torch.Tensor):
        ctx.call, ctx.guard = call, traced.guard
        keep = (lambda t: t.detach().clone()) if traced.guard.copy else (lambda t: t.detach())
        ctx.inputs = [(keep(t), t.requires_grad, t._version if not traced.guard.copy else None) for t in tensors]
        traced.audit.paused += 1
        try:
            with torch.no_grad():
                out = call([t.detach().clone() for t in tensors])
        finally:
            traced.audit.paused -= 1
        outputs = out if isinstance(out, tuple) else (out,)
        ctx.fingerprints = [_fingerprint(o) for o in outputs]
        return tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in outputs)

    @staticmethod
    def backward(ctx, *grads):
        inputs = []
        for tensor, requires_grad, version in ctx.inputs:
            if version is not None and tensor._version != version:
                raise InPlaceUpdateError("a block input was modified in place after the block ran")
            inputs.append(tensor.detach().requires_grad_(requires_grad))
        with torch.enable_grad(), ctx.guard.hooks():
            out = ctx.call([t.clone() if t.requires_grad else t for t in inputs])
        outputs = out if isinstance(out, tuple) else (out,)
        for recomputed, fingerprint in zip(outputs, ctx.fingerprints, strict=True):
            if not _same_fingerprint(_fingerprint(recomputed), fingerprint):
                raise RecomputeMismatchError("a block recomputed for the backward did not reproduce its forward output")
        pairs = [
            (o, g)
            for o, g in zip(outputs, grads, strict=True)
            if isinstance(o, torch.Tensor) and o.requires_grad and g is not None
        ]
        wanted = [t for t in inputs if t.requires_grad]
        found = iter(
            torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
            if pairs and wanted
            else [None] * len(wanted)
        )
        ctx.inputs = ctx.fingerprints = None
        return (None, None, *(next(found) if t.requires_grad else None for t in inputs))


def _fingerprint(value: Any) -> torch.Tensor | None:
    """``(Σx, Σx², n)`` of a floating tensor in float64 (None for anything else): cheap, and moves with any change."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return None
    flat = value.detach().double()
    return torch.stack([flat.sum(), flat.square().sum(), flat.new_tensor(flat.numel())])


def _same_fingerprint(got: torch.Tensor | None, want: torch.Tensor | None, rtol: float = 1e-3) -> bool:
    """Equal within ``rtol`` of the tensor's scale (the sum against ``√(n·Σx²)``, the square sum against itself)."""
    if got is None or want is None:
        return got is None and want is None
    scale = float(torch.sqrt(want[2] * want[1])) + 1e-30
    same_sum = abs(float(got[0] - want[0])) <= rtol * scale
    return same_sum and abs(float(got[1] - want[1])) <= rtol * float(want[1]) + 1e-30


class BlockCheckpointing:
    """Per-block recomputation for the memory-bounded exact estimator (``vjp-low-memory``).

    While active, each unit of :func:`checkpoint_units` runs as one :class:`_Recompute` node, so the graph holds the
    block inputs instead of every activation inside the blocks: one more conditional forward of compute (each block
    runs again during the backward) for a graph bounded by the block inputs plus one block. Calls whose gradient would
    be lost by that (a tensor requiring grad nested inside a container argument) run the block normally.
    """

    def __init__(self, network: torch.nn.Module, traced: TracedPass) -> None:
        self.units = checkpoint_units(network)
        self.traced = traced

    def _checkpointed(self, forward: Callable, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        names = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
        tensors = [args[i] for i in positions] + [kwargs[k] for k in names]
        if not any(t.requires_grad for t in tensors) or _nested_grad(args, kwargs, positions, names):
            return forward(*args, **kwargs)
        # dicts as they are now: ComfyUI's UNet loop rewrites its transformer_options ("block", …) in place later
        frozen_args = [dict(a) if isinstance(a, dict) else a for a in args]
        frozen_kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
        returned_tuple: list[bool] = []

        def call(values: list[torch.Tensor]) -> Any:
            new_args = [dict(a) if isinstance(a, dict) else a for a in frozen_args]
            for i, v in zip(positions, values[: len(positions)], strict=True):
                new_args[i] = v
            new_kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in frozen_kwargs.items()}
            for k, v in zip(names, values[len(positions) :], strict=True):
                new_kwargs[k] = v
            out = forward(*new_args, **new_kwargs)
            returned_tuple.append(isinstance(out, tuple))
            return out

        out = _Recompute.apply(call, self.traced, *tensors)
        return out if returned_tuple[0] else out[0]

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        previous: list[tuple[torch.nn.Module, Any]] = []
        try:
            for unit in self.units:
                previous.append((unit, unit.__dict__.get("forward")))
                unit.forward = functools.partial(self._checkpointed, unit.forward)
            yield
        finally:
            for unit, forward in reversed(previous):  # a unit listed twice gets its own forward back
                if forward is None:
                    unit.__dict__.pop("forward", None)
                else:
                    unit.forward = forward


def _nested_grad(args: tuple, kwargs: dict, positions: list[int], names: list[str]) -> bool:
    """Whether a tensor that requires grad hides inside a container argument (checkpointing would lose it)."""
    skip_args, skip_kwargs = set(positions), set(names)
    stack = [a for i, a in enumerate(args) if i not in skip_args]
    stack += [v for k, v in kwargs.items() if k not in skip_kwargs]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            if item.requires_grad:
                return True
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, dict) and len(item) < 64:
            stack.extend(v for v in item.values() if isinstance(v, (torch.Tensor, list, tuple)))
    return False


class TracedPass:
    """The context of one differentiated conditional pass and its backward (see the module docstring).

    ``network`` is the diffusion model (``BaseModel.diffusion_model``), ``parameters`` every weight the pass may save
    (the model's and attached ControlNets'); ``checkpoint`` turns on :class:`BlockCheckpointing`, ``copy`` the
    guard's private copies and ``budget`` its size limit (:class:`SavedTensorGuard`). Use
    ``with TracedPass(...) as tp:`` around both the forward and the backward, and call :meth:`check` after the
    forward.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        parameters: Iterable[torch.Tensor],
        *,
        checkpoint: bool,
        copy: bool,
        budget: float | None = None,
    ) -> None:
        self.parameters = list(parameters)
        self.guard = SavedTensorGuard(self.parameters, copy=copy, budget=budget)
        self.audit = GradientAudit(network)
        self.checkpointing = BlockCheckpointing(network, self) if checkpoint else None
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> TracedPass:
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.enable_grad())
            stack.enter_context(_in_training())
            stack.enter_context(_frozen(self.parameters))
            stack.enter_context(self.guard.hooks())
            stack.enter_context(self.guard.recasts.recording())
            stack.enter_context(self.audit.watching())
            if self.checkpointing is not None:
                stack.enter_context(self.checkpointing.active())
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc: object) -> None:
        stack, self._stack = self._stack, None
        self.guard.release()
        if stack is not None:
            stack.close()

    def check(self) -> None:
        """Raise :class:`NoGraphError` when the forward lost the gradient anywhere (see :class:`GradientAudit`)."""
        self.audit.check()

    def options(self, model_options: dict) -> dict:
        """``model_options`` with this pass's attention kernels: plain ones with a backward, and, without per-block
        recomputation, attention matrices recomputed in the backward rather than saved (:func:`kernel_options`)."""
        return kernel_options(model_options, recompute_attention=self.checkpointing is None)


@contextlib.contextmanager
def _frozen(parameters: list[torch.Tensor]) -> Iterator[None]:
    """Weights that require grad (a model loaded outside inference mode) stop requiring it meanwhile: M needs the
    input gradient only, and a weight gradient would make autograd keep every layer's input and cast weight."""
    thawed = [p for p in parameters if p.requires_grad and p.is_leaf]
    for p in thawed:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in thawed:
            p.requires_grad_(True)


@contextlib.contextmanager
def _in_training() -> Iterator[None]:
    """ComfyUI's ``in_training`` switch (plain-torch code paths in its models), restored in ``finally``.

    ComfyUI versions without the flag (0.3.64) have no custom kernels to avoid, so there is nothing to switch.
    """
    if not hasattr(comfy.model_management, "in_training"):
        yield
        return
    previous = comfy.model_management.in_training
    comfy.model_management.in_training = True
    try:
        with _eager_kitchen():
            yield
    finally:
        comfy.model_management.in_training = previous


# comfy_kitchen kernels that a ComfyUI model calls with no plain-torch branch of its own (ComfyUI 0.33: Cosmos
# Predict 2 and Anima call ``comfy.quant_ops.ck.rms_rope_split_half`` whatever ``in_training`` says). They are torch
# custom ops without an autograd formula; comfy_kitchen's eager backend implements the same function in plain torch.
EAGER_KITCHEN_KERNELS = ("rms_rope_split_half",)


@contextlib.contextmanager
def _eager_kitchen() -> Iterator[None]:
    """comfy_kitchen's eager (plain-torch, differentiable) implementations of :data:`EAGER_KITCHEN_KERNELS` in place
    of its custom ops, restored in ``finally``; nothing changes where comfy_kitchen or its eager backend is absent."""
    try:
        import comfy.quant_ops
        from comfy_kitchen.backends.eager import rope as eager
    except ImportError:
        yield
        return
    kitchen = getattr(comfy.quant_ops, "ck", None)
    swapped = [(name, getattr(kitchen, name)) for name in EAGER_KITCHEN_KERNELS if hasattr(kitchen, name)]
    swapped = [(name, original) for name, original in swapped if hasattr(eager, name)]
    try:
        for name, _ in swapped:
            setattr(kitchen, name, getattr(eager, name))
        yield
    finally:
        for name, original in swapped:
            setattr(kitchen, name, original)


# ComfyUI's attention kernels written in plain torch that save the attention matrix (heads × tokens × tokens) for
# their backward; PyTorch's SDPA saves only its inputs, output and log-sum-exp.
QUADRATIC_KERNELS = ("attention_basic", "attention_sub_quad", "attention_split")


class _RecomputedAttention(torch.autograd.Function):
    """One attention call whose backward runs it again: the graph keeps ``q``, ``k``, ``v`` and the call's other
    tensors (a mask; see :class:`_AttentionCall`), not the attention matrix a quadratic kernel would save. They are
    saved through the pass's saved-tensor guard like any saved tensor: version-checked, or copied where it copies.

    The recomputation's own graph lives only inside this backward: its saved tensors bypass the guard (they are not
    part of the pass's graph and must not count against its budget).
    """

    @staticmethod
    def forward(ctx, call: _AttentionCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *extras: torch.Tensor):
        ctx.call = call
        ctx.save_for_backward(q, k, v, *extras)
        return call(q, k, v, *extras)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        saved = ctx.saved_tensors
        needs = ctx.needs_input_grad[1:4]
        qkv = [t.detach().requires_grad_(need) for t, need in zip(saved[:3], needs, strict=True)]
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(torch.Tensor.detach, _unchanged):
            out = ctx.call(*qkv, *saved[3:])
        found = iter(torch.autograd.grad(out, [t for t in qkv if t.requires_grad], grad))
        return (None, *(next(found) if t.requires_grad else None for t in qkv), *(None for _ in saved[3:]))


def _unchanged(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@dataclass(frozen=True)
class _AttentionCall:
    """One attention call with its tensors other than ``q``, ``k``, ``v`` taken out (they travel as ``extras``, in
    the order of ``positions`` then ``names``), so that the backward calls the kernel with the tensors it saved.

    An inference tensor (a mask made while ComfyUI prepared the conditioning) cannot be saved for a backward; it stays
    in the call, where nothing can write to it (outside inference mode, where the pass runs, in place writes to an
    inference tensor raise).
    """

    kernel: Callable[..., torch.Tensor]
    rest: tuple
    kwargs: dict
    positions: tuple[int, ...]
    names: tuple[str, ...]

    @classmethod
    def of(cls, kernel: Callable, rest: tuple, kwargs: dict) -> tuple[_AttentionCall, list[torch.Tensor]]:
        positions = tuple(i for i, a in enumerate(rest) if _savable(a))
        names = tuple(name for name, a in kwargs.items() if _savable(a))
        extras = [rest[i] for i in positions] + [kwargs[name] for name in names]
        bare_rest = tuple(None if i in positions else a for i, a in enumerate(rest))
        frozen = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items() if k not in names}
        return cls(kernel, bare_rest, frozen, positions, names), extras  # options dicts copied: they may change later

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *extras: torch.Tensor) -> torch.Tensor:
        rest = list(self.rest)
        for position, tensor in zip(self.positions, extras[: len(self.positions)], strict=True):
            rest[position] = tensor
        named = dict(zip(self.names, extras[len(self.positions) :], strict=True))
        return self.kernel(q, k, v, *rest, **self.kwargs, **named)


def _savable(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and not value.is_inference()


def _recomputing(kernel: Callable) -> Callable:
    """``kernel`` as :class:`_RecomputedAttention` where it builds a graph through ``q``, ``k``, ``v`` only."""

    @functools.wraps(kernel)
    def attention(*args: Any, **kwargs: Any) -> Any:
        qkv, rest = args[:3], args[3:]
        recompute = (
            torch.is_grad_enabled()
            and len(qkv) == 3
            and all(type(t) is torch.Tensor for t in qkv)
            and any(t.requires_grad for t in qkv)
            and not any(isinstance(a, torch.Tensor) and a.requires_grad for a in (*rest, *kwargs.values()))
        )
        if not recompute:
            return kernel(*args, **kwargs)
        call, extras = _AttentionCall.of(kernel, rest, kwargs)
        return _RecomputedAttention.apply(call, *qkv, *extras)

    return attention


def _attention_override(previous: Callable | None, recompute: bool) -> Callable:
    """An ``optimized_attention_override`` that runs every attention call through a kernel with a backward.

    ComfyUI calls it with the kernel it chose at start-up (``func``): basic, sub-quadratic, split and PyTorch's SDPA
    kernels are plain torch and kept; sage, sageattn3, flash, xformers and int8 attention have no (or no exact)
    backward and are replaced by SDPA with the same arguments. With ``recompute``, a kernel of
    :data:`QUADRATIC_KERNELS` recomputes its attention matrix in the backward instead of saving it
    (:class:`_RecomputedAttention`). An override already in the options (another pack's) still runs, with the chosen
    kernel as its ``func``.
    """
    from comfy.ldm.modules import attention

    def raw(kernel: Callable) -> Callable:
        return getattr(kernel, "__wrapped__", kernel)

    quadratic = {raw(getattr(attention, name)) for name in QUADRATIC_KERNELS}
    sdpa = raw(attention.attention_pytorch)
    plain = quadratic | {sdpa}

    def override(func: Callable, *args: Any, **kwargs: Any) -> Any:
        kernel = func if raw(func) in plain else sdpa
        if recompute and raw(kernel) in quadratic:
            kernel = _recomputing(kernel)
        if previous is not None:
            return previous(kernel, *args, **kwargs)
        return kernel(*args, **kwargs)

    override.reg_plain_kernels = True
    override.reg_recompute = recompute
    override.reg_previous = previous
    return override


def kernel_options(model_options: dict, *, recompute_attention: bool = False) -> dict:
    """``model_options`` whose attention runs a kernel with a backward (:func:`_attention_override`); options that
    already carry REG's override keep it when it recomputes as asked, else get it replaced."""
    transformer_options = model_options.get("transformer_options", {})
    previous = transformer_options.get("optimized_attention_override")
    if getattr(previous, "reg_plain_kernels", False):
        if previous.reg_recompute == recompute_attention:
            return model_options
        previous = previous.reg_previous
    override = _attention_override(previous, recompute_attention)
    return {**model_options, "transformer_options": {**transformer_options, "optimized_attention_override": override}}


@contextlib.contextmanager
def plain_kernels(model_options: dict) -> Iterator[dict]:
    """``model_options`` whose attention runs a kernel with a backward, with ComfyUI's ``in_training`` on meanwhile.

    Used for the differentiated pass and, so that every prediction of the step comes from the same numeric path, for
    the step's other passes. Options that already carry REG's override are passed through unchanged.
    """
    previous = model_options.get("transformer_options", {}).get("optimized_attention_override")
    options = kernel_options(model_options, recompute_attention=getattr(previous, "reg_recompute", False))
    with _in_training():
        yield options
