"""Workflows behind the commands: encode a dataset into a latent / code cache, sample a generator
into a folder, score samples (``generation``); reconstruct image files (``reconstruct``)."""
