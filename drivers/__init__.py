"""Boundaries with the system: ALSA, JACK, real-time scheduling, systemd."""
