"""Reference PyTorch modules of Crab: the truth every other engine is measured against."""
