"""Preference data: sources, formats, chat templates, tokenization, the dataset, sampler, batches and packing."""
