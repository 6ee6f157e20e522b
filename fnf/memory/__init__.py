"""Peak GPU memory estimation by tracing the trainer under fake tensors (being written)."""
