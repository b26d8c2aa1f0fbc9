"""The commands around a run: data inspection, export, the demo and tiny local models."""
