"""The run: recipe, trainer loop, checkpoints, optimizer, distributed set-up, metrics, time budget."""
