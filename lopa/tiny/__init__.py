"""The bundled tiny dLLM: word-problem task, tokenizer, ``lopa train`` and the shipped checkpoint.

Any command given no ``--model`` loads the checkpoint in ``checkpoint/`` (found by
:func:`lopa.checkpoint.bundled.default_checkpoint_dir`). It is trained from scratch by ``lopa train`` (see
``checkpoint/MODEL_CARD.md`` for the exact command and scores).
"""
