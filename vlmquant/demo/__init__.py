"""Offline demo data: photos shipped in pip packages, hand-written captions and a text corpus
(dataset.py). The tiny demo models are built by vlmquant.models.tiny."""
