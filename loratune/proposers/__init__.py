"""Proposers: from the history of an arm, the next points to train.

``make_proposer(name, space, objectives, seed, **options)`` builds one; ``check_options`` checks
a proposer's options without building it; ``AVAILABLE_PROPOSERS`` names them without importing
any (GPTune, GPy, pygmo, Optuna and BoTorch load only when a proposer is made).
"""

from loratune.proposers.base import AVAILABLE_PROPOSERS, Proposer, check_options, make_proposer

__all__ = ["AVAILABLE_PROPOSERS", "Proposer", "check_options", "make_proposer"]
