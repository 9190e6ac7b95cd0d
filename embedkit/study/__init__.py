"""Whole studies from one YAML file (`embedkit run`), and the demo study (`embedkit demo`).

:mod:`embedkit.study.options` maps a dict of options to an extraction, probe or finetune request
(with the request's defaults); the CLI commands and the pipeline steps both build their requests
through it.
"""
