"""Training: data, the shared loop and the trainers."""
