"""Integrations with other libraries. Nothing here is imported by ``import svdtune``:

- ``svdtune.integrations.transformers``: a ``TrainerCallback`` that writes the delta into each
  checkpoint, and `save_merged` (needs transformers);
- ``svdtune.integrations.guard``: the warning when ``save_pretrained`` is called on an unmerged
  adapted model (no third-party import; `svdtune.apply` installs it).
"""
