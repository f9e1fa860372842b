"""`meshfit.data`: data feeding (documented path; the code lives in `meshfit.engine.data`)."""

from meshfit.engine.data import MicroBatches, PerProcess, Placer, Prefetcher, make_loader

__all__ = ["MicroBatches", "PerProcess", "Placer", "Prefetcher", "make_loader"]
