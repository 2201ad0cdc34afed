"""Loading models, their facts as data, and checked tokenization."""
