"""Loads the compiled extension decovae_fast._C (which registers torch.ops.decovae.*), if built."""
import contextlib

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


# ---- the CPU kernels' instruction set (csrc/cpu/capability.h) ------------------------------------
# The hot CPU kernels are compiled for the portable baseline, AVX2 and AVX-512, and one is chosen at
# run time: the best the CPU runs, or DECOVAE_CPU_CAPABILITY=default|avx2|avx512.

def cpu_capability() -> str | None:
    """The instruction set the CPU kernels run with (None without the extension). Raises
    RuntimeError when DECOVAE_CPU_CAPABILITY names one this CPU does not run."""
    return _C.cpu_capability() if _C is not None else None


def cpu_capability_reason() -> str:
    """One line: what was chosen and why (or why nothing was)."""
    if _C is None:
        return "no CPU kernels (the extension is not built)"
    try:
        return _C.cpu_capability_reason()
    except RuntimeError as exc:
        return f"error: {exc}".splitlines()[0]


def supported_cpu_capabilities() -> list[str]:
    """The instruction sets this CPU runs, portable first ([] without the extension)."""
    return list(_C.supported_cpu_capabilities()) if _C is not None else []


def set_cpu_capability(name: str) -> None:
    """Force the CPU kernels' instruction set for the rest of the process (RuntimeError if unknown or
    not run by this CPU)."""
    if _C is None:
        raise RuntimeError("the extension is not built")
    _C.set_cpu_capability(name)


@contextlib.contextmanager
def forced_cpu_capability(name: str):
    """The CPU kernels of instruction set `name` inside the block, the previous choice restored after."""
    before = cpu_capability()
    set_cpu_capability(name)
    try:
        yield name
    finally:
        set_cpu_capability(before)
