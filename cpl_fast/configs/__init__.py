"""YAML presets of cpl-train (package data)."""
