"""m2diff-monai: MRI-guided low-dose PET enhancement with diffusion models (M2Diff, MFdiff) on MONAI."""

__version__ = "0.1.0"
