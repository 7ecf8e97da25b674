"""Efficiency benchmark of Speeder against its text-description mode (see efficiency.py)."""
