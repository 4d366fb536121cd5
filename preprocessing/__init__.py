"""Preprocessing of raw NIfTI subjects into registered, normalized volumes, 2D slices and MONAI manifests.

Stages: subjects table (:mod:`preprocessing.subjects`) → intake/validation (:mod:`preprocessing.intake`) →
registration, mask, normalization, crop, slices, split, manifest, QC (:mod:`preprocessing.pipeline`).
The command line is ``m2diff-preprocess`` (:mod:`preprocessing.cli`). Nothing is imported here so that
``m2diff-preprocess --help`` and ``validate`` stay fast.
"""
