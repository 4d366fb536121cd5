"""m2diff-monai: MRI-guided low-dose PET enhancement with diffusion models (M2Diff, MFdiff) on MONAI."""

__version__ = "0.1.0"


def _set_up_bundle_run() -> None:
    """Under ``python -m monai.bundle``: thread count for a shared node and one-line errors (see bundle_run)."""
    from m2diff_monai import bundle_run

    if bundle_run.running_monai_bundle():
        bundle_run.install()


_set_up_bundle_run()
