"""Evaluation: `ft eval` (command.py), scoring generated answers against references (scoring.py) and generating
them for a whole eval set, on one or several ranks (generation.py), which training's evaluation.generate uses too."""
