"""Fast paths of the SE blocks: what :mod:`scse_seg.blocks.se` runs instead of its eager formulas.

The eager formulas of the blocks are the reference; each fast path is checked against them.
:func:`se` picks, per call:

* CUDA (or CPU tensors under the Triton interpreter when :data:`TRITON_ON_CPU` is set, for
  tests): the fused Triton kernels (:mod:`.triton_se`) through the custom ops of :mod:`.ops`,
  for every mode, once they passed their self-check for that kind of map (:mod:`.selfcheck`);
* CPU, when a gradient is wanted: for scSE (max and add), one autograd Function
  (:mod:`.cpu_se`) that saves ``x`` and the gates instead of eager scSE's two or three maps;
  cSE and sSE keep their eager formulas, which save one map already, as inference does
  (nothing is saved there);
* ``None`` otherwise (the caller runs its eager formulas): under ``SCSE_SEG_FUSED=0`` (the one
  switch that turns every fast path off), and while ``torch.compile`` / ``torch.export`` /
  ``torch.jit`` trace the model (the compiler fuses the formulas; exporters see standard ops),
  except for Triton kernels already trusted, whose custom ops trace.

Triton is imported lazily, on first use, so ``import scse_seg`` never needs it. Its CPU
interpreter (``TRITON_INTERPRET=1``, set before the first use) runs the same kernels on CPU
tensors: that is how the tests check them without a GPU.
"""
from __future__ import annotations

import os

import torch

__all__ = ["available", "enabled", "fused_se", "fused_se_function", "interpreting", "se"]

_TRITON: bool | None = None  # can the kernels run here? (decided once, on first use)
# Tests only: route CPU tensors to the Triton kernels (under TRITON_INTERPRET=1), and replace
# the kernel function (e.g. by a wrong one, to test the self-check).
TRITON_ON_CPU = False
TRITON_FN = None


def enabled() -> bool:
    """False under ``SCSE_SEG_FUSED=0``: every block runs its eager formulas."""
    return os.environ.get("SCSE_SEG_FUSED", "1").strip().lower() not in ("0", "false", "off", "no")


def interpreting() -> bool:
    """True when Triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def available() -> bool:
    """True when the fused kernels can run: fast paths on, Triton imports, and a CUDA device or
    the interpreter is there (decided on the first call of the process)."""
    global _TRITON
    if _TRITON is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _TRITON = interpreting() or torch.cuda.is_available()
        except Exception:  # ImportError, or a broken install raising at import
            _TRITON = False
    return enabled() and _TRITON


def _ops():
    if not available():
        raise RuntimeError("fused SE kernels need triton and a CUDA device (or TRITON_INTERPRET=1)")
    from . import ops

    return ops


def fused_se_function(x: torch.Tensor, mode: str, **params) -> torch.Tensor:
    """The fused kernels on ``x``: ``mode`` "cse", "sse", "scse_max" or "scse_add"; ``params``
    fc1_w, fc1_b, fc2_w, fc2_b (cSE) and sse_w, sse_b (sSE)."""
    return _ops().se_function(x, mode, **params)


def fused_se(x: torch.Tensor, module: torch.nn.Module, mode: str) -> torch.Tensor:
    """Run block ``module`` (ChannelSE, SpatialSE or ConcurrentSE) on ``x`` with the kernels."""
    from .gates import module_params

    return fused_se_function(x, mode, **module_params(module, mode))


def _triton(x: torch.Tensor, mode: str, params: dict) -> torch.Tensor | None:
    from . import selfcheck

    fn = TRITON_FN or _ops().se_function
    if torch.compiler.is_compiling():  # no check while tracing: only kernels already trusted
        return fn(x, mode, **params) if selfcheck.known(x, mode) else None
    return fn(x, mode, **params) if selfcheck.trusted(fn, x, mode) else None


def se(x: torch.Tensor, mode: str, params: dict) -> torch.Tensor | None:
    """Block ``mode`` ("cse", "sse", "scse_max", "scse_add") on ``x`` with ``params`` (see
    :func:`.gates.module_params`) on its device's fast path; None: run the eager formulas."""
    if not enabled():
        return None
    if x.is_cuda or (TRITON_ON_CPU and x.device.type == "cpu"):
        return _triton(x, mode, params) if available() else None
    from . import cpu_se

    if (x.device.type != "cpu" or mode not in cpu_se.MODES or torch.compiler.is_compiling()
            or torch.jit.is_tracing() or torch.jit.is_scripting() or not torch.is_grad_enabled()
            or not (x.requires_grad or any(p is not None and p.requires_grad
                                           for p in params.values()))):
        return None
    return cpu_se.se_function(x, mode, **params)
