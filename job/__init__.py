"""Transfer-learning image classifier: a batch job from labelled image folders to a SavedModel."""
