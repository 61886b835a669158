"""Offline evaluation: scoring splits and writing reports."""
