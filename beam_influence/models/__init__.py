"""Built-in model specs (the embedded default: scikit-learn's digits, no download)."""
