"""Thin Prefect tasks around ftcore's steps; each task's cache key is the step's content key."""
