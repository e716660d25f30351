"""GRU4Rec and its baselines: the algorithm, usable as a library without Kafka.

Data flows one way: ``stream`` imports ``model``; ``model`` never imports ``stream``.
"""
