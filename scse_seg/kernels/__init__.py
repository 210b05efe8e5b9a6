"""Fast implementations of the SE blocks (cSE, sSE, scSE max/add; 2D and 3D).

:func:`se` is what the blocks call. It picks, per call:

* the fused Triton kernels, on CUDA (or on CPU tensors when :data:`TRITON_ON_CPU` is set under
  the Triton interpreter, for tests), once they passed their self-check (:mod:`.selfcheck`);
* otherwise the PyTorch fast path (:mod:`.fast_se`): one autograd Function saving only ``x`` and
  the gates;
* ``None`` (the caller runs its eager formulas) under ``SCSE_SEG_FUSED=0``, while
  ``torch.compile`` / ``torch.export`` / ``torch.jit`` trace the model (the compiler fuses the
  plain formulas; exporters see standard ops), and off the Triton path when no gradient is
  wanted (inference: the fast path's gain is in what it saves for backward and in backward;
  its compiled steps would cost a compilation per predict process), and on CPU for maps smaller
  than :data:`.fast_se.MIN_ELEMENTS` (where the eager formulas measured faster).

The Triton kernels:

Two passes over the map forward (squeeze, excite) and two backward (reduce, input gradient),
instead of the many passes eager ops make; see :mod:`.triton_se` (kernels) and :mod:`.ops`
(custom ops ``scse_seg::se_forward`` & co. with autograd, torch.compile-compatible).

Triton is imported lazily, on first use, so ``import scse_seg`` never needs it. The Triton CPU
interpreter (``TRITON_INTERPRET=1``, set *before* the first use) runs the same kernels on CPU
tensors, which is how the tests check them without a GPU. The blocks themselves take the fused
path only for CUDA tensors (``scse_seg.blocks.se._use_fused``); on CPU call :func:`fused_se` or
:func:`fused_scse` directly.
"""
from __future__ import annotations

import os

import torch

__all__ = ["available", "enabled", "se", "fused_se", "fused_cse", "fused_sse", "fused_scse",
           "fused_se_function",
           "interpreting"]


_TRITON: bool | None = None  # cached result of the import attempt


def _triton_importable() -> bool:
    global _TRITON
    if _TRITON is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _TRITON = True
        except Exception:  # ImportError, or a broken install raising at import
            _TRITON = False
    return _TRITON


def interpreting() -> bool:
    """True when Triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def enabled() -> bool:
    """False under ``SCSE_SEG_FUSED=0``: every block runs its plain eager formulas (the
    reference, e.g. to rule the fast paths out)."""
    return os.environ.get("SCSE_SEG_FUSED", "1").strip().lower() not in ("0", "false", "off", "no")


def available() -> bool:
    """True when the fused kernels can run: Triton imports and either a CUDA device is present or
    the Triton interpreter is on (then they run, slowly, on CPU tensors). ``SCSE_SEG_FUSED=0``
    turns them off, so every block runs its eager formulas (e.g. to rule the kernels out)."""
    if not enabled():
        return False  # escape hatch: eager formulas everywhere
    if not _triton_importable():
        return False
    return interpreting() or torch.cuda.is_available()


def _ops():
    if not _triton_importable():
        raise RuntimeError("fused SE kernels need triton (pip install triton)")
    from . import ops

    return ops


def fused_se(x: torch.Tensor, module: torch.nn.Module, mode: str) -> torch.Tensor:
    """Run ``module`` (ChannelSE, SpatialSE or ConcurrentSE) on ``x`` with the fused kernels.
    ``mode``: "cse", "sse", "scse_max" or "scse_add"."""
    return _ops().fused_se(x, module, mode)


def fused_se_function(x: torch.Tensor, mode: str, **params) -> torch.Tensor:
    """Functional form: ``params`` are fc1_w, fc1_b, fc2_w, fc2_b (cSE) and sse_w, sse_b (sSE)."""
    return _ops().fused_se_function(x, mode, **params)


def fused_cse(x, fc1_w, fc1_b, fc2_w, fc2_b):
    """Fused cSE: ``x * sigmoid(fc2(relu(fc1(mean(x)))))``."""
    return _ops().fused_cse(x, fc1_w, fc1_b, fc2_w, fc2_b)


def fused_sse(x, sse_w, sse_b):
    """Fused sSE: ``x * sigmoid(conv1x1(x))``."""
    return _ops().fused_sse(x, sse_w, sse_b)


def fused_scse(x, fc1_w, fc1_b, fc2_w, fc2_b, sse_w, sse_b, fusion: str = "max"):
    """Fused scSE: ``max(x*g_c, x*g_s)`` or ``x*(g_c + g_s)``."""
    return _ops().fused_scse(x, fc1_w, fc1_b, fc2_w, fc2_b, sse_w, sse_b, fusion)


# Tests only: route CPU tensors to the Triton kernels (they must run under TRITON_INTERPRET=1),
# and replace the kernel function (e.g. by a wrong one, to test the self-check).
TRITON_ON_CPU = False
TRITON_FN = None


def _triton_fn():
    return TRITON_FN if TRITON_FN is not None else _ops().fused_se_function


def _wants_triton(x: torch.Tensor) -> bool:
    return (x.is_cuda or (TRITON_ON_CPU and x.device.type == "cpu")) and available()


def se(x: torch.Tensor, mode: str, params: dict) -> torch.Tensor | None:
    """The block ``mode`` ("cse", "sse", "scse_max", "scse_add") on ``x`` with ``params`` (see
    :func:`.fast_se.module_params`) on the fastest trusted path; None: run the eager formulas."""
    if not enabled():
        return None
    from . import fast_se, selfcheck

    compiling = torch.compiler.is_compiling()
    if _wants_triton(x):
        fn = _triton_fn()
        if compiling:  # cannot run a check while tracing: use the kernels only if already trusted
            if selfcheck.known(x, mode):
                return fn(x, mode, **params)
        elif selfcheck.trusted(fn, x, mode):
            return fn(x, mode, **params)
    if compiling or torch.jit.is_tracing() or torch.jit.is_scripting():
        return None
    if not (torch.is_grad_enabled()
            and (x.requires_grad or any(p is not None and p.requires_grad for p in params.values()))):
        return None  # inference: nothing is saved for backward; no compile for a predict call
    if x.device.type == "cpu" and x.numel() < fast_se.min_elements(mode):
        return None  # small map: the eager formulas cost less per call (fast_se.MIN_ELEMENTS)
    return fast_se.se_function(x, mode, **params)
