"""Datasets bundled with or read by nanprobe."""
