"""Readouts: what the model predicts and which components write it."""
