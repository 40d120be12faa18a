"""Strategies: selectors, merge ops, localities and schedules — pure tensor code, no diffusers."""
