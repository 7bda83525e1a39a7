"""Every closed set of values a config key takes, each listed once: a ``Literal`` type
for the dataclass field hints, and its values as a tuple (``typing.get_args``) for the
validation, the command line's ``choices=`` and the code."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

# the DSMAE variants (SPEC sections 1-4), built by dsmae.models.DSMAE
DsmaeMethod = Literal["dsmae", "dsmae-ly", "dsmae-lz"]
Method = Literal[DsmaeMethod, "mae"]  # ... and the MAE baseline
Arch = Literal["vit_tiny", "vit_small", "vit_base"]
NoiseMode = Literal["add", "replace"]  # noise on the chosen patches | pure noise instead
TargetNorm = Literal["none", "layernorm"]  # teacher tokens as they are | standardised per token
# what the teacher encodes: the whole clean image (the paper's) | only the clean patches at
# the noisy positions (SdAE's teacher sees only the masked patches)
TeacherInput = Literal["clean", "noisy"]
Pool = Literal["avg", "cls"]  # the features read from an encoder: mean of the patch tokens, [CLS]
ProbeRecipe = Literal["fast", "mae"]  # SGD on cached features | LARS on live augmented ones
EmaEvery = Literal["step", "epoch"]  # when the teacher follows the student
CompileScope = Literal["model", "blocks"]  # the step as one graph | one per encoder block
# Inductor's modes (torch.compile's ``mode``); "default" passes none
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
# scaled_dot_product_attention's kernels (torch.nn.attention.SDPBackend); "auto": torch picks
AttentionKernel = Literal["auto", "flash", "efficient", "cudnn", "math"]

DSMAE_METHODS: tuple[DsmaeMethod, ...] = get_args(DsmaeMethod)
METHODS: tuple[Method, ...] = get_args(Method)
NOISE_MODES: tuple[NoiseMode, ...] = get_args(NoiseMode)
TARGET_NORMS: tuple[TargetNorm, ...] = get_args(TargetNorm)
TEACHER_INPUTS: tuple[TeacherInput, ...] = get_args(TeacherInput)
POOLS: tuple[Pool, ...] = get_args(Pool)
PROBE_RECIPES: tuple[ProbeRecipe, ...] = get_args(ProbeRecipe)
EMA_EVERY: tuple[EmaEvery, ...] = get_args(EmaEvery)
COMPILE_SCOPES: tuple[CompileScope, ...] = get_args(CompileScope)
COMPILE_MODES: tuple[CompileMode, ...] = get_args(CompileMode)
ATTENTION_KERNELS: tuple[AttentionKernel, ...] = get_args(AttentionKernel)

# arch: (depth, width, heads), paper section 4.A, in the order of Arch; MLP ratio 4 for all
ARCHS: dict[Arch, tuple[int, int, int]] = dict(
    zip(get_args(Arch), ((12, 192, 3), (12, 384, 6), (12, 768, 12)), strict=True)
)


@dataclass(frozen=True)
class MethodTraits:
    """What a method is, which every other place asks instead of comparing names: a new
    variant is one row of :data:`METHOD_TRAITS`."""

    teacher: bool  # an EMA teacher, and a regressor of its tokens (L_z)
    pixel_decoder: bool  # a decoder of the corrupted patches' pixels (L_y)
    drops_patches: bool  # the encoder sees only the visible patches (MAE); else all, noisy
    noise_ratio: float  # the share of patches corrupted where model.noise_ratio is not set


METHOD_TRAITS: dict[Method, MethodTraits] = {  # teacher, pixel decoder, drops patches, ratio
    "dsmae": MethodTraits(True, True, False, 0.9),
    "dsmae-ly": MethodTraits(False, True, False, 0.9),
    "dsmae-lz": MethodTraits(True, False, False, 0.9),
    "mae": MethodTraits(False, True, True, 0.75),
}
METHODS_WITH_TEACHER: tuple[Method, ...] = tuple(m for m in METHODS if METHOD_TRAITS[m].teacher)
# the share of patches corrupted where model.noise_ratio is not set: MAE masks 75 %
DEFAULT_NOISE_RATIO: dict[Method, float] = {m: METHOD_TRAITS[m].noise_ratio for m in METHODS}
