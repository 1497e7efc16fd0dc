"""Datasets and formats: GLDv2 CSVs and layout, folder collections, robust decoding, synthetic data."""
