"""Typed, validated views of params.yaml: one module per section.

One module per stage's section, so editing one stage's params class makes stale only the
stages that read it; `base` holds what they share and `project` the whole file with its
cross-section checks. Nothing is imported here: importing a section's module must not
import the others.
"""
