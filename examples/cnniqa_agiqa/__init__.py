"""Reference application: CNNIQA adapted to AI-generated images with svdtune.

Run `python -m examples.cnniqa_agiqa --help`; see README.md in this folder.
"""
