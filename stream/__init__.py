"""The service around the model: Kafka, Faust, brokers, replay, metrics and the CLI."""
