"""Exact shortcuts of the method, each tested equal to the plain computation: the prefix cache of z's forward
passes, layer replay of the key reads, and MLP reads at chosen positions."""
