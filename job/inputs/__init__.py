"""Inputs: the labelled images, their splits and shards, the feature caches and their budget, the data audit."""
