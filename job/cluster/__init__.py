"""Cluster: one machine or several (tf.distribute), and what this process is in the run."""
