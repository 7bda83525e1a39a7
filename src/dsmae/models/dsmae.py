"""DSMAE and its variants (SPEC sections 1-3) behind one module.

=========== ======================================================================
method      what the student does
=========== ======================================================================
dsmae       encodes every patch of the noisy image; pixel decoder and regressor
            on the noisy tokens; ``L = lam * L_y + (1 - lam) * L_z``
dsmae-ly    the same without teacher and regressor: ``L = L_y``
dsmae-lz    the same without pixel decoder: ``L = L_z``
mae         encodes only the visible patches; the decoder sees mask tokens
            elsewhere; ``L = L_y`` on the masked patches
=========== ======================================================================
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from dsmae.config import ModelConfig
from dsmae.losses import combine_losses, feature_loss, pixel_loss
from dsmae.masking import num_selected, random_patch_mask, split_indices
from dsmae.models.heads import FeatureRegressor, PixelDecoder
from dsmae.models.vit import create_encoder, encode_visible, patch_tokens
from dsmae.noise import add_patch_noise, zero_patches
from dsmae.patches import gather_tokens, patchify, scatter_tokens


@dataclass
class PretrainOutput:
    """What one forward pass of a pre-training model returns.

    Attributes:
        loss: scalar, the training objective.
        loss_y: scalar pixel loss, or None for dsmae-lz.
        loss_z: scalar feature loss, or None for dsmae-ly and mae.
        mask: (B, N) bool, True on the corrupted (noisy, or for mae masked) patches.
        noisy: (B, C, H, W) the student's input (mae: masked patches zeroed, for display).
        pred: (B, N, p*p*C) predicted pixels in the loss's target space, rows where
            ``mask`` is False unspecified; None for dsmae-lz (no decoder).
    """

    loss: torch.Tensor
    loss_y: torch.Tensor | None
    loss_z: torch.Tensor | None
    mask: torch.Tensor
    noisy: torch.Tensor
    pred: torch.Tensor | None


class DSMAE(nn.Module):
    """A pre-training model: student encoder, optional EMA teacher, decoder and regressor.

    Args:
        cfg: a resolved :class:`~dsmae.config.ModelConfig` (see :func:`dsmae.build`).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.method = cfg.method
        self.patch_size = cfg.patch_size
        self.num_patches = (cfg.img_size // cfg.patch_size) ** 2
        self.num_corrupted = num_selected(self.num_patches, cfg.noise_ratio)

        self.encoder: VisionTransformer = create_encoder(cfg)
        self.teacher: VisionTransformer | None = None
        if cfg.method in ("dsmae", "dsmae-lz"):
            self.teacher = copy.deepcopy(self.encoder).requires_grad_(False).eval()
        self.decoder: PixelDecoder | None = None
        if cfg.method != "dsmae-lz":
            self.decoder = PixelDecoder(
                in_dim=cfg.embed_dim,
                dim=cfg.decoder_dim,
                depth=cfg.decoder_depth,
                num_heads=cfg.decoder_heads,
                grid=cfg.img_size // cfg.patch_size,
                out_dim=cfg.patch_size**2 * cfg.in_chans,
                mlp_ratio=cfg.mlp_ratio,
                mask_token=cfg.method == "mae",
            )
        self.regressor: FeatureRegressor | None = None
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

    def sample_corruption(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Draw what corrupts a batch: the patch mask, and the standard-normal noise
        (None for mae, which masks instead).

        Drawing these for a whole global batch and slicing it lets several processes
        (or micro-batches) reproduce a single process's step exactly.

        Returns:
            mask (B, N) bool and eps (B, C, H, W) float32 or None.
        """
        mask = random_patch_mask(
            batch_size,
            self.num_patches,
            self.config.noise_ratio,
            generator=generator,
            device=device,
        )
        if self.method == "mae":
            return mask, None
        c, size = self.config.in_chans, self.config.img_size
        draw_device = generator.device if generator is not None else device
        eps = torch.randn(batch_size, c, size, size, generator=generator, device=draw_device)
        return mask, eps.to(device) if device is not None else eps

    def forward(
        self,
        images: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        mask: torch.Tensor | None = None,
        eps: torch.Tensor | None = None,
    ) -> PretrainOutput:
        """One pre-training forward pass: corrupt, encode, decode and compare.

        Args:
            images: (B, C, H, W) normalised images.
            generator: source of the mask and noise (None: the global RNG).
            mask, eps: a corruption drawn beforehand by :meth:`sample_corruption`
                ((B, N) bool and (B, C, H, W)); drawn here when not given.
        """
        if mask is None:
            mask, eps = self.sample_corruption(images.shape[0], generator, images.device)
        corrupted, clean = split_indices(mask, self.num_corrupted)
        if self.method == "mae":
            student_input = zero_patches(images, mask, self.patch_size)
            pred, loss_z = self._forward_mae(images, clean), None
            pred_corrupted = gather_tokens(pred, corrupted)
        else:
            student_input = add_patch_noise(
                images,
                mask,
                self.patch_size,
                std=self.config.noise_std,
                mode=self.config.noise_mode,
                eps=eps,
                generator=generator,
            )
            pred_corrupted, loss_z = self._forward_denoise(images, student_input, corrupted)
            pred = None
            if pred_corrupted is not None:
                pred = scatter_tokens(pred_corrupted, corrupted, self.num_patches)
        loss_y = None
        if pred_corrupted is not None:
            target = gather_tokens(patchify(images, self.patch_size), corrupted)
            loss_y = pixel_loss(pred_corrupted, target, norm_pix=self.config.norm_pix_loss)
        loss = combine_losses(loss_y, loss_z, self.config.lam)
        return PretrainOutput(loss, loss_y, loss_z, mask, student_input, pred)

    def _forward_denoise(
        self, images: torch.Tensor, noisy: torch.Tensor, corrupted: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """DSMAE's student and teacher branches (SPEC steps 4-9).

        Args:
            images: (B, C, H, W) clean images (the teacher's input).
            noisy: (B, C, H, W) the student's input.
            corrupted: (B, K) indices of the noisy patches.

        Returns:
            decoder output (B, K, p*p*C) or None, and ``L_z`` or None.
        """
        tokens = gather_tokens(patch_tokens(self.encoder, noisy), corrupted)  # Z_n' (B, K, D)
        pred = self.decoder(tokens, corrupted) if self.decoder is not None else None
        loss_z = None
        if self.teacher is not None and self.regressor is not None:
            with torch.no_grad():
                target = gather_tokens(patch_tokens(self.teacher, images), corrupted)  # Z_o'
            loss_z = feature_loss(
                self.regressor(tokens), target, target_norm=self.config.target_norm
            )
        return pred, loss_z

    def _forward_mae(self, images: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """MAE: encode the visible patches only, decode every patch. Returns (B, N, p*p*C)."""
        latent = encode_visible(self.encoder, images, visible)  # (B, 1 + V, D)
        return self.decoder.forward_masked(latent, visible)

    @torch.no_grad()
    def update_teacher(self, momentum: float, apply: torch.Tensor | None = None) -> None:
        """``teacher <- m * teacher + (1 - m) * student`` (eq. 4); buffers are copied.

        Args:
            momentum: m.
            apply: optional 0-d bool tensor; where False the teacher is left as it is.
                Decided on the device, so a step that was skipped for a non-finite
                gradient skips the update without a host synchronisation.

        A no-op for the methods without a teacher.
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
