"""Tools: jobs that sit on top of the library (building the embedded teacher runs the trainer)."""
