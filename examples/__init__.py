"""Runnable examples of disagg deployments."""
