"""Prefect flows of ftstudy."""
