"""Evaluation material made at test and bench time (never committed): MIDI rendered to audio."""
