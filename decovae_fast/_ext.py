"""Loads the compiled extension decovae_fast._C (which registers torch.ops.decovae.*), if built."""
try:
    from decovae_fast import _C  # noqa: F401  (importing registers the ops)

    LOAD_ERROR = None
except ImportError as exc:  # not built: only the reference (and Triton) backends exist
    _C = None
    LOAD_ERROR = str(exc)


def cpu_compiled() -> bool:
    return _C is not None


def cuda_compiled() -> bool:
    return _C is not None and _C.cuda_compiled()
