"""Bridges to other libraries' model formats (today: diffusers)."""
