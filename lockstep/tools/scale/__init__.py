"""What one rank of a large job costs in start-up, data and checkpoint I/O, counted on one CPU."""
