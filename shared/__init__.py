"""The fine-tune app's own package, organised by what each module does."""
