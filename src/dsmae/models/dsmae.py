"""DSMAE and its two ablations (SPEC sections 1-3).

=========== ======================================================================
method      what the student does
=========== ======================================================================
dsmae       encodes every patch of the noisy image; pixel decoder and regressor
            on the noisy tokens; ``L = lam * L_y + (1 - lam) * L_z``
dsmae-ly    the same without teacher and regressor: ``L = L_y``
dsmae-lz    the same without pixel decoder: ``L = L_z``
=========== ======================================================================

MAE, the baseline, is :class:`~dsmae.models.mae.MAE`.
"""

from __future__ import annotations

import copy

import torch

from dsmae.config import DSMAE_METHODS, METHOD_TRAITS, ModelConfig
from dsmae.losses import block_average_target, combine_losses, feature_loss
from dsmae.masking import split_indices
from dsmae.models.decoder import PixelDecoder
from dsmae.models.pretrain import DisplayOutput, PretrainModel, PretrainOutput
from dsmae.models.regressor import FeatureRegressor
from dsmae.models.vit import block_outputs, encode_visible, patch_tokens
from dsmae.noise import add_patch_noise
from dsmae.patches import gather_tokens, scatter_tokens


class DSMAE(PretrainModel):
    """Student encoder, EMA teacher (dsmae, dsmae-lz), pixel decoder (dsmae, dsmae-ly) and
    feature regressor (where the teacher is).

    Args:
        cfg: a resolved :class:`~dsmae.config.ModelConfig` of a DSMAE method.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        if cfg.method not in DSMAE_METHODS:
            raise ValueError(
                f"DSMAE builds {', '.join(DSMAE_METHODS)}, not {cfg.method!r}: use "
                "dsmae.models.build_model"
            )
        super().__init__(cfg)
        traits = METHOD_TRAITS[cfg.method]
        if traits.teacher:
            self.teacher = copy.deepcopy(self.encoder).requires_grad_(False).eval()
        if traits.pixel_decoder:
            self.decoder = PixelDecoder.from_config(cfg)
        if self.teacher is not None:
            self.regressor = FeatureRegressor(
                cfg.embed_dim, cfg.regressor_depth, cfg.num_heads, cfg.mlp_ratio
            )

    def train(self, mode: bool = True) -> DSMAE:
        """As ``nn.Module.train``, but the teacher stays in eval mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def sample_noise(
        self, batch_size: int, generator: torch.Generator | None, device: torch.device | str | None
    ) -> torch.Tensor:
        """The standard-normal noise of a batch: (B, C, H, W) float32 on ``device``, drawn
        where ``generator`` is (on ``device`` without one)."""
        c, size = self.config.in_chans, self.config.img_size
        draw_device = generator.device if generator is not None else device
        eps = torch.randn(batch_size, c, size, size, generator=generator, device=draw_device)
        return eps.to(device) if device is not None else eps

    def losses(
        self, images: torch.Tensor, mask: torch.Tensor, eps: torch.Tensor | None
    ) -> PretrainOutput:
        """SPEC steps 3-10 on (B, C, H, W) images, noisy on ``mask`` (B, N) from ``eps``
        (B, C, H, W): encode the noisy images, decode pixels and regress the teacher's
        tokens of the clean images at the K noisy patches; ``L_y``, ``L_z`` and ``L``."""
        corrupted = self.student_positions(mask)  # (B, K)
        tokens = self.encode_student(self.corrupt(images, mask, eps), corrupted)  # Z_n' (B, K, D)
        pred = None if self.decoder is None else self.decode_pixels(tokens, corrupted)
        loss_z = None
        if self.regressor is not None:
            target = self.encode_teacher(images, corrupted)  # Z_o' (B, K, D)
            loss_z = self.feature_loss(self.regress_features(tokens), target)
        loss_y = None if pred is None else self.pixel_loss(pred, images, corrupted)
        return PretrainOutput(combine_losses(loss_y, loss_z, self.config.lam), loss_y, loss_z, mask)

    def student_positions(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, N) bool -> (B, K) int64 indices of the noisy patches, ascending: the tokens
        the heads see."""
        return split_indices(mask, self.num_corrupted)[0]

    def corrupt(
        self, images: torch.Tensor, mask: torch.Tensor, eps: torch.Tensor | None
    ) -> torch.Tensor:
        """SPEC step 3: the noise ``eps`` (B, C, H, W) on the patches of ``mask`` (B, N) of
        ``images`` (B, C, H, W). Returns (B, C, H, W)."""
        return add_patch_noise(
            images,
            mask,
            self.patch_size,
            std=self.config.noise_std,
            mode=self.config.noise_mode,
            eps=eps,
        )

    def encode_student(self, images: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """SPEC steps 4-5: the student encodes every patch of the (B, C, H, W) noisy images;
        its tokens at the (B, K) ``positions`` are kept: Z_n' (B, K, D)."""
        return gather_tokens(patch_tokens(self.encoder, images), positions)

    @torch.no_grad()
    def encode_teacher(self, images: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """SPEC step 6: the teacher's tokens of the (B, C, H, W) clean images at the (B, K)
        ``positions``, without gradient: Z_o' (B, K, D).

        By default (the paper's) the teacher encodes every clean patch and its final
        tokens are kept. ``model.teacher_input="noisy"``: it encodes only the clean
        patches at ``positions`` (with their position embeddings), as SdAE's teacher
        sees only the masked patches. ``model.target_layers=K`` > 1: the tokens are
        :func:`~dsmae.losses.block_average_target` of its last K blocks (data2vec).
        """
        keep = positions if self.config.teacher_input == "noisy" else None
        layers = self.config.target_layers
        if layers == 1 and keep is None:
            return gather_tokens(patch_tokens(self.teacher, images), positions)
        if layers == 1:
            tokens = encode_visible(self.teacher, images, keep)
        else:
            tokens = block_average_target(block_outputs(self.teacher, images, layers, keep))
        tokens = tokens[:, self.teacher.num_prefix_tokens :]  # (B, V, D)
        return tokens if keep is not None else gather_tokens(tokens, positions)

    def decode_pixels(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """SPEC step 7: (B, K, D) tokens at (B, K) ``positions`` -> (B, K, p*p*C) pixels."""
        return self.decoder(tokens, positions)

    def regress_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """SPEC step 8: (B, K, D) student tokens -> (B, K, D) predicted teacher tokens."""
        return self.regressor(tokens)

    def feature_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``L_z``: (B, K, D) regressed tokens against the (B, K, D) teacher tokens. Scalar."""
        return feature_loss(pred, target, target_norm=self.config.target_norm)

    def display(
        self, images: torch.Tensor, mask: torch.Tensor, eps: torch.Tensor | None
    ) -> DisplayOutput:
        """The noisy images and the decoder's prediction put back at the noisy patches
        ((B, N, p*p*C), zero elsewhere; None for dsmae-lz)."""
        noisy = self.corrupt(images, mask, eps)
        if self.decoder is None:
            return DisplayOutput(noisy, None, mask)
        corrupted = self.student_positions(mask)
        pred = self.decode_pixels(self.encode_student(noisy, corrupted), corrupted)
        return DisplayOutput(noisy, scatter_tokens(pred, corrupted, self.num_patches), mask)

    @torch.no_grad()
    def update_teacher(self, momentum: float, apply: torch.Tensor | None = None) -> None:
        """``teacher <- m * teacher + (1 - m) * student`` (eq. 4); buffers are copied.

        Args:
            momentum: m.
            apply: optional 0-d bool tensor; where False the teacher is left as it is.
                Decided on the device, so a step that was skipped for a non-finite
                gradient skips the update without a host synchronisation.

        A no-op for dsmae-ly, which has no teacher.
        """
        if self.teacher is None:
            return
        teacher_params = list(self.teacher.parameters())
        student_params = [p.detach() for p in self.encoder.parameters()]
        if apply is None:
            torch._foreach_lerp_(teacher_params, student_params, 1.0 - momentum)
        else:
            delta = torch._foreach_sub(student_params, teacher_params)
            torch._foreach_mul_(delta, apply.to(teacher_params[0].dtype) * (1.0 - momentum))
            torch._foreach_add_(teacher_params, delta)
        for t, s in zip(self.teacher.buffers(), self.encoder.buffers(), strict=True):
            t.copy_(s)
