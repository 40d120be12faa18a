"""Adapters: integration of tokred with diffusers models (no strategy logic here)."""
