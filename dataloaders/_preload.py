"""Imported by the forkserver that :class:`dataloaders.DataLoader` starts workers from (never
by user code): loads torch and this package once, then freezes the server's objects
(``gc.freeze()``) so the workers forked from it never walk them in a garbage collection (a
full collection would copy every page of the inherited heap on write, in every worker)."""

from __future__ import annotations

import gc

import numpy.random  # noqa: F401  (every worker seeds numpy's global generator)
import torch.utils.data  # noqa: F401

import dataloaders

for _name in dataloaders.__all__:  # the package's names load on first use: load them now
    getattr(dataloaders, _name)

gc.collect()  # what is garbage now need not be inherited by every worker
gc.freeze()
