"""Moved to :mod:`cpl_fast.train.steps.negative_grad`; this name is kept for one release."""
from cpl_fast._deprecated import moved

moved(__name__, __spec__.name)
