"""`imagen tune`: hyperparameter search on Optuna (the tune extra), each trial an ordinary run through imagen.api."""

from .search import TuneResult, TuneSettings, tune
from .space import check_space, load_space

__all__ = ["TuneResult", "TuneSettings", "check_space", "load_space", "tune"]
