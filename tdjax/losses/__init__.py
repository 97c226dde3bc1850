"""Tokenizer losses: LPIPS, GAN discriminators and losses, DiffAugment, first-token alignment.

Every pretrained network (LPIPS-VGG16, DINO ViT-S/16, the alignment teacher) takes a weights FILE
named by the user (flat-key `.npz`, see `tdjax.losses.weights`); nothing is downloaded.

Parameters carry logical axes ('embed', 'mlp', 'heads', 'head_dim', 'conv_in', 'conv_out',
'kernel' for 1-D conv taps, 'kernel_h'/'kernel_w' for 2-D ones, 'code_dim'); everything is fp32.
"""

from tdjax.losses.alignment import (AlignmentProjector, ViTTeacher, alignment_loss,
                                    cosine_similarity, load_teacher_params, teacher_features)
from tdjax.losses.augment import diff_augment
from tdjax.losses.discriminators import (DinoDiscriminator, DinoViT, PatchGAN, SpectralConv1d,
                                         consistency_loss, frozen_param_labels, hinge_d_loss,
                                         hinge_g_loss, init_lecam_ema, lecam_reg,
                                         load_dino_backbone, update_lecam_ema, with_backbone)
from tdjax.losses.lpips import LPIPS, load_lpips_params, lpips_loss
from tdjax.losses.weights import (WeightsError, flatten_params, load_npz_params,
                                  save_npz_params)

__all__ = [
    "AlignmentProjector", "ViTTeacher", "alignment_loss", "cosine_similarity",
    "load_teacher_params", "teacher_features", "diff_augment", "DinoDiscriminator", "DinoViT",
    "PatchGAN", "SpectralConv1d", "consistency_loss", "frozen_param_labels", "hinge_d_loss",
    "hinge_g_loss", "init_lecam_ema", "lecam_reg", "load_dino_backbone", "update_lecam_ema",
    "with_backbone", "LPIPS", "load_lpips_params", "lpips_loss", "WeightsError",
    "flatten_params", "load_npz_params", "save_npz_params",
]
