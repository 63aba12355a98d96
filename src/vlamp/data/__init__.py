"""Demonstration data: generation in Meta-World, the LeRobot v3.0 layout, and the training Dataset."""
