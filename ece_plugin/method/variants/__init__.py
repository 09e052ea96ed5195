"""Departures from the paper, kept out of the method's core."""
