"""Training settings and the error a run that cannot start or continue raises."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from anymc3d.errors import AnyMC3DError
from anymc3d.plugin_file import check_card


#: the CPU plan: a full-size backbone (img_size >= 224) on a CPU trains on slices of this size, this many per volume,
#: unless --input-size / --num-slices say otherwise (a ViT-S/14 forward+backward costs 1.19 s a slice at 224 px, 0.18 s
#: at 112 px on 2 cores: 85 minutes an epoch at the full defaults on 24 cases)
CPU_INPUT_SIZE, CPU_NUM_SLICES = 112, 24


#: the settings that describe the plugin (its model card) rather than change what is learnt: a resumed run takes
#: them from its command line, not from the checkpoint's identity
CARD_FIELDS = ("name", "description", "modality", "body_part")


class TrainingError(AnyMC3DError):
    """A training run that cannot start or continue (bad options, checkpoint of another run)."""


@dataclass
class TrainConfig:
    """Training settings; the defaults learn on small data sets (see the tests)."""

    epochs: int = 30
    batch_size: int = 2                  # volumes per micro-batch
    accumulation: int = 1                # micro-batches per optimizer step (over all processes)
    lr_lora: float = 1e-4
    wd_lora: float = 1e-5
    lr_head: float = 1e-3
    wd_head: float = 1e-4
    warmup_fraction: float = 0.1         # of all optimizer steps
    patience: int = 10                   # epochs without a better validation AUROC before stopping
    gamma: float = 2.0
    alpha: float = 0.25
    seed: int = 0
    augment: bool = True
    standardize: bool = True
    lora: bool = True                    # False: train queries and head only (frozen features)
    lambda_seg: float = 1.0              # weight of the auxiliary Dice + CE (cases with masks only)
    aux_seg: Optional[bool] = None       # None: on when some training cases have masks
    input_size: Optional[int] = None     # None: the backbone's img_size
    num_slices: Optional[int] = None     # None: keep each volume's slice count
    intensity: str = "auto"
    window: Optional[str] = "soft_tissue"
    chunk_size: int = 32
    cache_embeddings: Optional[bool] = None  # None: when LoRA, augmentation and the auxiliary segmentation are off
    val_fraction: float = 0.25           # without a split column
    name: str = ""                       # the plugin's model card ("": name from --out, description generated)
    description: str = ""
    modality: str = ""                   # DICOM Modality code (CT, MR, ...), read by anymc3d.modality
    body_part: str = ""

    def __post_init__(self):
        check_card(**{key: getattr(self, key) for key in CARD_FIELDS if key != "name" or self.name})
        for key in ("epochs", "batch_size", "accumulation", "chunk_size"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"{key}: must be a positive integer, got {getattr(self, key)!r}")
        if self.patience < 1:
            raise ValueError(f"patience: must be >= 1, got {self.patience!r}")
        for key in ("lr_lora", "lr_head"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key}: must be positive, got {getattr(self, key)!r}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction: must be in [0, 1), got {self.warmup_fraction!r}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction: must be in (0, 1), got {self.val_fraction!r}")
        if self.lambda_seg < 0:
            raise ValueError(f"lambda_seg: must be >= 0, got {self.lambda_seg!r}")
        from anymc3d.losses import FocalLossConfig  # here: the command line reads the defaults without torch

        FocalLossConfig(self.gamma, self.alpha)

