"""Checkpoints on disk: finding, reading, checking and writing them.

``loader`` (a directory or hub id → a loaded model, tokenizer and config), ``checks`` (what the loader refuses:
missing or pickled weight files, layer counts, non-finite values), ``save`` (a model → a directory of its family),
``safetensors_io`` (positioned tensor reads, no memory map), ``lora`` (peft adapters merged at load), ``tokenizer``
(text ↔ ids, chat templates, special ids), ``hub`` (a ``--model`` value → a local directory) and ``bundled`` (where
the shipped checkpoint lives). Everything here stands on :mod:`lopa.model`; nothing in ``model/`` imports it.
"""
