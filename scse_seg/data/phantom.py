"""Built-in default data: a deterministic synthetic brain-MR-like phantom in MSD layout.

Why synthetic: the default run must work on a fresh clone with no downloads. The phantom is
written as a real MSD folder (imagesTr/, labelsTr/, dataset.json with NON-contiguous label
values) so the exact code path used for real datasets is exercised. Each subject has ten
structures of very different sizes (cortex ~20% of voxels, a pineal-like nucleus < 0.1%),
left/right pairs, a smooth multiplicative bias field, noise, subject-specific intensity scaling,
random smooth deformation and jitter of every structure; a third of the subjects are stored as
uint8 like some real scanners' exports.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter, zoom

# (label value, name, centre (x, y, z) in [-1, 1], radii, mean intensity, mirrored partner x)
_STRUCTURES = [
    (10, "cortex", (0.0, 0.0, 0.0), (0.80, 0.85, 0.78), 0.55),
    (20, "white matter", (0.0, 0.0, 0.0), (0.66, 0.72, 0.64), 0.85),
    (30, "ventricles", (0.0, 0.08, 0.12), (0.26, 0.34, 0.16), 0.15),
    (40, "left caudate", (-0.24, 0.18, 0.16), (0.11, 0.20, 0.12), 0.62),
    (50, "right caudate", (0.24, 0.18, 0.16), (0.11, 0.20, 0.12), 0.62),
    (60, "left thalamus", (-0.17, -0.22, 0.0), (0.14, 0.16, 0.13), 0.72),
    (70, "right thalamus", (0.17, -0.22, 0.0), (0.14, 0.16, 0.13), 0.72),
    (80, "left hippocampus", (-0.42, -0.12, -0.32), (0.08, 0.24, 0.08), 0.45),
    (90, "right hippocampus", (0.42, -0.12, -0.32), (0.08, 0.24, 0.08), 0.45),
    (100, "pineal", (0.0, -0.48, 0.08), (0.06, 0.06, 0.06), 0.30),
]
VERSION = 1


def _params(n_cases: int, shape, seed: int) -> dict:
    return dict(version=VERSION, n_cases=n_cases, shape=list(shape), seed=seed)


def _smooth_noise(rng: np.random.Generator, shape, cells: int) -> np.ndarray:
    """Smooth random field: cubic upsampling of a ``cells``^3 grid of Gaussian noise."""
    small = rng.normal(0, 1, (cells,) * 3).astype(np.float32)
    out = zoom(small, [s / cells for s in shape], order=3, mode="reflect")
    return out[tuple(slice(0, s) for s in shape)]


def _subject(shape, rng: np.random.Generator):
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape],
                                indexing="ij"))
    # smooth random deformation (a few voxels), same for every structure of this subject
    coarse = [_smooth_noise(rng, shape, 6) for _ in range(3)]
    disp = np.stack([c / (np.abs(c).max() + 1e-6) * 0.06 for c in coarse])
    coords = grid + disp
    label = np.zeros(shape, dtype=np.uint8)
    image = np.zeros(shape, dtype=np.float32)
    scale = rng.uniform(0.92, 1.08)
    for value, _, centre, radii, mean in _STRUCTURES:
        c = np.asarray(centre) + rng.normal(0, 0.025, 3)
        r = np.asarray(radii) * scale * rng.uniform(0.9, 1.1, 3)
        inside = sum(((coords[i] - c[i]) / r[i]) ** 2 for i in range(3)) <= 1.0
        label[inside] = value
        image[inside] = mean * rng.uniform(0.95, 1.05)
    # subject intensity variation, smooth bias field, texture and noise
    bias = _smooth_noise(rng, shape, 3)
    bias = 1.0 + 0.25 * bias / (np.abs(bias).max() + 1e-6)
    texture = gaussian_filter(rng.normal(0, 1, shape).astype(np.float32), 1.0) * 0.03
    image = (image + texture * (label > 0)) * bias
    image = image * rng.uniform(0.7, 1.4) + rng.uniform(-0.05, 0.1)
    image = np.abs(image + rng.normal(0, 0.04, shape).astype(np.float32))  # Rician-like floor
    image[label == 0] *= 0.3
    return image.astype(np.float32), label


def generate_phantom(root: str | Path, n_cases: int = 12, shape=(64, 64, 48), seed: int = 0,
                     overwrite: bool = False) -> Path:
    """Write (or reuse) the phantom dataset at ``root``; returns ``root``. Deterministic in
    ``seed``; an existing folder generated with the same parameters is reused as is."""
    import nibabel as nib

    root = Path(root)
    params = _params(n_cases, shape, seed)
    js = root / "dataset.json"
    if js.is_file() and not overwrite:
        try:
            meta = json.loads(js.read_text())
        except json.JSONDecodeError:
            meta = {}
        if meta.get("phantom") == params and all(
                (root / e["image"]).is_file() and (root / e["label"]).is_file()
                for e in meta.get("training", [])):
            return root
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    affine = np.diag([1.0, 1.0, 1.2, 1.0])
    training = []
    for i in range(n_cases):
        rng = np.random.default_rng([seed, i])
        image, label = _subject(tuple(shape), rng)
        name = f"phantom_{i:03d}"
        if i % 3 == 2:  # like some scanners' exports: 8-bit
            image = np.clip(image / image.max() * 255, 0, 255).astype(np.uint8)
        nib.save(nib.Nifti1Image(image, affine), str(root / "imagesTr" / f"{name}.nii.gz"))
        nib.save(nib.Nifti1Image(label, affine), str(root / "labelsTr" / f"{name}.nii.gz"))
        training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    labels = {"0": "background", **{str(v): n for v, n, *_ in _STRUCTURES}}
    meta = dict(name="scse_seg phantom", description="synthetic brain-MR-like phantom "
                "(scse_seg built-in default data)", tensorImageSize="3D", modality={"0": "MRI"},
                labels=labels, numTraining=n_cases, training=training, phantom=params)
    tmp = js.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(js)  # written last: a half-generated folder is regenerated next time
    return root
