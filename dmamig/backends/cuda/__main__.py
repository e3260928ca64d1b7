"""``python -m dmamig.backends.cuda``: compile every kernel through NVRTC for sm_80 and sm_90 and print one
line each (no GPU needed); exit 1 when one failed, 0 with a note when cupy or NVRTC is not installed."""

from .kernels import nvrtc_check

if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(nvrtc_check())
