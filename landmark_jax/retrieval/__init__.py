"""Retrieval: embedding extraction, kNN search, metrics, ensembles, submissions."""
