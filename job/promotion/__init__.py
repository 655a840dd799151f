"""Promotion: whether a finished run replaces the production model, its versions and rollback."""
