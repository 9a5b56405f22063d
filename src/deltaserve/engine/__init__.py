"""Requests, scheduling, batch building, the model runner, sampling and the step loop."""
