"""One file per data set, each reading it as its publisher ships it: its format, its layout text and its download entry
(`fetch`, where its files are public by URL). The registry of data sets is `datasets.REGISTRY`, one row each; what the
loaders share is in `reading.py`, fetching in `fetching.py`. Adding a data set: its file here, its row there, its
test."""
