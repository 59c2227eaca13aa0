"""Front ends, one file each: arrays in, model inputs out.

- :mod:`edgeav.preprocess.clip`: CLIP pixels.
- :mod:`edgeav.preprocess.fbank`: BEATs' Kaldi fbank.
- :mod:`edgeav.preprocess.sam`: SAM's resize-longest-side, normalise and pad.
"""
