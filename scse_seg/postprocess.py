"""Postprocessing of predicted labels: keep the largest connected component of a class, and the
data-driven choice of the classes it helps, as nnU-Net makes it (Isensee et al. 2021).

Removing all but the largest component of a structure that is one connected piece in anatomy
(a hippocampus, a ventricle) deletes isolated false positives; for a structure that is several
pieces it deletes true positives. So, like nnU-Net, it is applied only to the classes for which it
raised the mean Dice on the cross-validation (held-out) predictions, and the choice is written to
``postprocessing.json`` in the run folder, where ``eval/predict.py`` finds and applies it.
Components are labelled by ``scipy.ndimage.label`` with full connectivity (voxels touching by a
face, an edge or a corner are connected, as MONAI's ``KeepLargestConnectedComponent``, which needs
scikit-image); removed voxels become background.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

FILE = "postprocessing.json"


def keep_largest_component(classes: np.ndarray, apply_to: Sequence[int]) -> np.ndarray:
    """Class indices with every class in ``apply_to`` reduced to its largest connected component
    (each class on its own); the other voxels of those classes become background (0)."""
    out = np.array(classes, dtype=np.int64)
    if not len(apply_to):
        return out
    from scipy import ndimage

    full = ndimage.generate_binary_structure(out.ndim, out.ndim)
    for c in apply_to:
        components, n = ndimage.label(out == c, structure=full)
        if n > 1:
            largest = 1 + int(np.bincount(components.ravel())[1:].argmax())
            out[(components > 0) & (components != largest)] = 0
    return out


def choose_classes(pairs: Sequence[tuple[np.ndarray, np.ndarray]], num_classes: int
                   ) -> tuple[list[int], dict[int, tuple[float, float]]]:
    """The foreground classes whose mean Dice over the (prediction, reference) ``pairs`` rises
    when only their largest component is kept, and per class (mean Dice before, after). A class
    is chosen only for a strict gain; volumes where it is absent from both are left out."""
    from .metrics import dice_per_class

    before: dict[int, list[float]] = {c: [] for c in range(1, num_classes)}
    after: dict[int, list[float]] = {c: [] for c in range(1, num_classes)}
    for pred, ref in pairs:
        d0 = dice_per_class(pred, ref, num_classes)
        d1 = dice_per_class(keep_largest_component(pred, list(range(1, num_classes))), ref,
                            num_classes)
        for c in range(1, num_classes):
            if np.isfinite(d0[c]):
                before[c].append(float(d0[c]))
                after[c].append(float(d1[c]) if np.isfinite(d1[c]) else 0.0)
    means = {c: (float(np.mean(before[c])), float(np.mean(after[c])))
             for c in before if before[c]}
    return [c for c, (b, a) in means.items() if a > b], means


def write_choice(run_dir: str | Path, chosen: Sequence[int], means: dict, class_names: list[str],
                 volumes: int) -> Path:
    from .fileio import atomic_write_text

    path = Path(run_dir) / FILE
    atomic_write_text(path, json.dumps(dict(
        keep_largest_component=[class_names[c] for c in chosen],
        decided_on=f"{volumes} held-out volume(s): mean Dice per class without and with only "
                   "the largest component; applied where it rose",
        mean_dice={class_names[c]: dict(without=b, with_largest_component=a)
                   for c, (b, a) in means.items()}), indent=1))
    return path


def read_choice(run_dir: str | Path, class_names: list[str]) -> list[int] | None:
    """The class indices ``postprocessing.json`` of ``run_dir`` names; None without the file."""
    from .errors import UserError

    path = Path(run_dir) / FILE
    if not path.is_file():
        return None
    try:
        names = json.loads(path.read_text())["keep_largest_component"]
        return [class_names.index(n) for n in names]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a postprocessing choice for this run ({type(e).__name__}: "
                        f"{e}); delete it and run eval/postprocess.py again") from None


def choice_of_runs(run_dirs: Sequence[str | Path], class_names: list[str]) -> list[int]:
    """The classes to postprocess for a run or an ensemble: the runs' ``postprocessing.json``
    (the same choice in every run, as eval/postprocess.py writes it); [] where there is none."""
    from .errors import UserError

    choices = {str(r): read_choice(r, class_names) for r in run_dirs}
    found = {k: v for k, v in choices.items() if v is not None}
    if not found:
        return []
    if len(found) != len(choices) or len({tuple(v) for v in found.values()}) > 1:
        which = ", ".join(f"{k}: {v}" for k, v in choices.items())
        raise UserError(f"the runs' {FILE} files differ ({which}); run eval/postprocess.py on "
                        "all of them together, or pass --no-postprocessing")
    return next(iter(found.values()))
