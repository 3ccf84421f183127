"""What REG meets in a model's options: which hooks are guidance, which act after it, and what REG cannot join.

REG rectifies guidance: ``D_c + M ⊙ (D_guided − D_c)``, where ``D_guided`` is the prediction once every guidance
hook has run. A post-cfg function that is not guidance (Epsilon Scaling, TemporalScoreRescaling, the cfg++
samplers' bookkeeping) changes even an unguided prediction, so it acts on REG's result instead of inside M's
product. The table below says which core function is which (README, "Compatibility with the rest of your graph");
a function it does not know is treated as guidance and named once in the run's log line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

GUIDANCE = True
AFTER_REG = False

# Core post-cfg functions by (module, class or function that installs them): guidance or not.
POST_CFG: dict[tuple[str, str], bool] = {
    ("nodes_pag", "PerturbedAttentionGuidance"): GUIDANCE,
    ("nodes_sag", "SelfAttentionGuidance"): GUIDANCE,
    ("nodes_slg", "SkipLayerGuidanceDiT"): GUIDANCE,
    ("nodes_cfg", "CFGZeroStar"): GUIDANCE,
    ("nodes_cfg", "CFGNorm"): GUIDANCE,
    ("nodes_mahiro", "Mahiro"): GUIDANCE,
    ("nodes_lt", "LTXVReferenceAudio"): GUIDANCE,
    ("nodes_lt", "LTXVSpatioTemporalGuidance"): GUIDANCE,
    ("nodes_lt", "LTXVModalityGuidance"): GUIDANCE,
    ("guidance_hooks", "pag_post_cfg"): GUIDANCE,  # this pack's PAG (REG Guider)
    ("nodes_eps", "EpsilonScaling"): AFTER_REG,
    ("nodes_eps", "TemporalScoreRescaling"): AFTER_REG,
    ("nodes_model_patch", "SUPIRApply"): AFTER_REG,
}
# Samplers that add a post-cfg function to read the negative prediction (cfg++): bookkeeping, not guidance.
SAMPLER_MODULES = ("comfy.k_diffusion.sampling", "nodes_advanced_samplers")
# Patches that need the positive and the negative chunk in the same batch (they read one chunk to change the other).
COBATCH_PATCHES = {("nodes_nag", "NAGuidance")}
# Model wrappers that serve cached predictions instead of running the network.
CACHE_WRAPPERS = {"easycache": "EasyCache", "lazycache": "LazyCache"}
# Pre-cfg functions whose sampler cfg is APG's cond-anchored scale (the result is D_c + cfg·G).
COND_ANCHORED = {("nodes_apg", "APG"), ("guidance_hooks", "APGPreCfg")}


def origin(fn: Callable) -> tuple[str, str]:
    """``(module, owner)`` of a hook: the last part of its module's name and the first part of its qualified name.

    ComfyUI loads its extras by file path, so their module names are paths: only the file's stem is kept.
    """
    target = getattr(fn, "func", fn)  # functools.partial
    module = getattr(target, "__module__", None) or type(target).__module__
    qualname = getattr(target, "__qualname__", None) or type(target).__qualname__
    stem = module.replace("\\", "/").rsplit("/", 1)[-1].rsplit(".", 1)[-1]
    return stem, qualname.split(".", 1)[0]


def name_of(fn: Callable) -> str:
    """A readable name for a hook in the log: the node that installed it, or ``module.function``."""
    stem, owner = origin(fn)
    known = POST_CFG.keys() | COBATCH_PATCHES | COND_ANCHORED
    return owner if (stem, owner) in known else f"{stem}.{owner}"


def is_sampler_hook(fn: Callable) -> bool:
    target = getattr(fn, "func", fn)
    module = getattr(target, "__module__", "") or ""
    return any(module == m or module.endswith(m) for m in SAMPLER_MODULES)


def acts_after_reg(fn: Callable) -> bool:
    """Whether a post-cfg function is not guidance (it acts on REG's result): known non-guidance or cfg++."""
    return is_sampler_hook(fn) or POST_CFG.get(origin(fn), GUIDANCE) is AFTER_REG


def _patch_functions(model_options: dict) -> Iterable[Callable]:
    patches = model_options.get("transformer_options", {}).get("patches", {})
    for functions in patches.values():
        yield from (f for f in functions if callable(f))


@dataclass(frozen=True)
class Composition:
    """The guidance a step's ``model_options`` carry, as REG sees it."""

    always: tuple[str, ...]  # guidance whatever the cfg: post-cfg guidance, a cond-batch function, co-batched patches
    with_negative: tuple[str, ...]  # guidance computed from the negative prediction: pre-cfg functions, the cfg slot
    after_reg: tuple[str, ...]  # post-cfg functions that act on REG's result (cfg++ bookkeeping not named)
    cobatch: bool  # a patch needs the positive and negative chunks in one batch
    cond_anchored: bool  # the cfg is APG's cond-anchored scale

    @classmethod
    def of(cls, model_options: dict) -> Composition:
        post = model_options.get("sampler_post_cfg_function", [])
        pre = model_options.get("sampler_pre_cfg_function", [])
        cobatched = [f for f in _patch_functions(model_options) if origin(f) in COBATCH_PATCHES]
        calc = [f for f in [model_options.get("sampler_calc_cond_batch_function")] if f is not None]
        cfg_slot = [f for f in [model_options.get("sampler_cfg_function")] if f is not None]
        return cls(
            always=_names([*calc, *(f for f in post if not acts_after_reg(f)), *cobatched]),
            with_negative=_names([*pre, *cfg_slot]),
            after_reg=_names(f for f in post if acts_after_reg(f) and not is_sampler_hook(f)),
            cobatch=bool(cobatched),
            cond_anchored=any(origin(f) in COND_ANCHORED for f in pre),
        )


def _names(functions: Iterable[Callable]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(name_of(f) for f in functions))


def without_cond_anchored(model_options: dict) -> dict:
    """``model_options`` without the APG pre-cfg functions (for a step without guidance)."""
    pre = model_options.get("sampler_pre_cfg_function", [])
    return {**model_options, "sampler_pre_cfg_function": [f for f in pre if origin(f) not in COND_ANCHORED]}


def cache_nodes(model_options: dict) -> list[str]:
    """The cache nodes (EasyCache, LazyCache) whose wrappers the model carries."""
    wrappers = model_options.get("transformer_options", {}).get("wrappers", {})
    keys = {key for per_type in wrappers.values() for key in per_type}
    return sorted(name for key, name in CACHE_WRAPPERS.items() if key in keys)


def describe(cfg: Any, composition: Composition) -> str:
    """What REG rectifies, for the run's log line: ``cfg 7 + PerturbedAttentionGuidance; after REG: EpsilonScaling``."""
    base = f"cfg {cfg:g}" if isinstance(cfg, (int, float)) else "the guider's guidance"
    parts = [base, *composition.with_negative, *composition.always]
    text = " + ".join(parts)
    return f"{text}; after REG: {', '.join(composition.after_reg)}" if composition.after_reg else text
