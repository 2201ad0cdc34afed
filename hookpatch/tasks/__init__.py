"""Prompt sets: clean and corrupted prompts with answers and named positions."""
