"""Whole studies from one YAML file (`embedkit run`), and the demo study (`embedkit demo`)."""
