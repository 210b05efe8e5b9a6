"""2D augmentation with albumentations (image and label mask transformed together; the mask
always with nearest-neighbour interpolation so no new label values appear)."""
from __future__ import annotations

DEFAULTS = {"affine": 0.0, "elastic": 0.0, "flip": False, "brightness_contrast": 0.0, "noise": 0.0}


def trained_flip_axes(augment: dict | None, dim: int = 2) -> tuple[int, ...]:
    """Slice axes (of an (N, 1, H, W) batch) that training flipped: (-1,) when ``data.augment``
    has ``flip`` on (``HorizontalFlip`` flips the width axis, the last in-plane one), else ().
    3D patch training does not augment. Test-time flips must stay within these: a flip the model
    never saw (e.g. superior-inferior on coronal slices) is not a harmless augmentation."""
    if dim != 2:
        return ()
    return (-1,) if {**DEFAULTS, **(augment or {})}["flip"] else ()


def build_augmentation(cfg: dict | None):
    """Pipeline from probabilities, e.g. ``{"affine": 0.5, "elastic": 0.2, "flip": False,
    "brightness_contrast": 0.5, "noise": 0.3}``; ``None``/all zero -> no augmentation.

    Left-right flips are off by default: many atlases label left and right structures apart.
    """
    import albumentations as A
    import cv2

    from ..errors import ConfigError

    cfg = dict(cfg or {})
    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
        raise ConfigError(f"unknown data.augment key(s) {sorted(unknown)}; valid: {sorted(DEFAULTS)}")
    p = {**DEFAULTS, **cfg}
    ops = []
    if p["affine"]:
        ops.append(A.Affine(scale=(0.9, 1.1), rotate=(-10, 10), translate_percent=(-0.05, 0.05),
                            interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST,
                            border_mode=cv2.BORDER_REPLICATE, p=float(p["affine"])))
    if p["elastic"]:
        ops.append(A.ElasticTransform(alpha=20, sigma=5, interpolation=cv2.INTER_LINEAR,
                                      mask_interpolation=cv2.INTER_NEAREST,
                                      border_mode=cv2.BORDER_REPLICATE, p=float(p["elastic"])))
    if p["flip"]:
        ops.append(A.HorizontalFlip(p=0.5 if p["flip"] is True else float(p["flip"])))
    if p["brightness_contrast"]:
        ops.append(A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1,
                                              p=float(p["brightness_contrast"])))
    if p["noise"]:
        ops.append(A.GaussNoise(std_range=(0.01, 0.05), p=float(p["noise"])))
    if not ops:
        return None
    return A.Compose(ops, seed=0)
