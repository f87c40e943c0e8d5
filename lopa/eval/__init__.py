"""Benchmark evaluation: tasks, answer extraction, sandboxed code execution, the eval loop, sweeps and plots.

Entry points: ``lopa eval`` (:mod:`lopa.commands.eval`), ``lopa sweep`` (:mod:`lopa.eval.sweep`) and the optional
lm-eval model (:mod:`lopa.eval.lm_eval_adapter`, imported only on request). Nothing here is imported by the
engine; the model is reached only through the public :class:`lopa.LLM` API.
"""
