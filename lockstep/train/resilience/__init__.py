"""Staying up and ending cleanly: collective timeouts, torchft fault tolerance and the healing of a
replica group that fell behind."""
