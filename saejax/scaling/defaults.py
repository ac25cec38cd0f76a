"""Defaults shared by the library and `saejax fit`, in a module light enough for the CLI's parser to import."""

METRIC = "nmse"  # held-out normalised MSE, the loss the laws describe
BOOTSTRAP = 1000  # resamples for the percentile CIs
CONFIDENCE = 0.95
SEED = 0
OUT_SUBDIR = "fit"  # `saejax fit DIR` writes into DIR/fit unless --out says otherwise
