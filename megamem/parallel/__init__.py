"""Parallelism applied to the model from outside: process groups, ZeRO, expert and pipeline layouts."""
