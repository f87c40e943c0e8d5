"""The bundled tiny dLLMs: word-problem task, tokenizer, ``lopa train`` and the shipped checkpoints.

Any command given no ``--model`` loads the checkpoint in ``checkpoint/`` (``lopa-tiny``, Dream format); ``--model
lopa-tiny-block`` loads the block-diffusion model in ``checkpoint-block/`` (SDAR format). Both are found by
:mod:`lopa.checkpoint.bundled` and trained from scratch by ``lopa train`` (see each directory's ``MODEL_CARD.md``
for the exact command and scores).
"""
