"""Proposers: from the history of an arm, the next points to train.

``make_proposer(name, space, objectives, seed, **options)`` builds one; ``AVAILABLE_PROPOSERS``
names them without importing any (GPTune, GPy and pygmo load only when ``gptune`` is made).
"""

from loratune.proposers.base import AVAILABLE_PROPOSERS, Proposer, make_proposer

__all__ = ["AVAILABLE_PROPOSERS", "Proposer", "make_proposer"]
