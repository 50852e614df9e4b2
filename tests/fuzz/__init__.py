"""Fuzzing of the artifact reader and validator: a mutation engine, an oracle and a hypothesis test."""
