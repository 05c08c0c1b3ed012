"""loratune: multi-objective Bayesian search for LoRA/QLoRA fine-tuning hyperparameters."""

from loratune.space import SearchSpace, SpaceError

__version__ = "0.1.0"

__all__ = ["SearchSpace", "SpaceError", "make_proposer", "__version__"]


def __getattr__(name):
    # The proposers pull in GPTune, GPy and pygmo; import them only when asked for.
    if name == "make_proposer":
        from loratune.proposers import make_proposer

        return make_proposer
    raise AttributeError(name)
