"""The client library: routing, inference sessions, forward/backward, generate()."""
