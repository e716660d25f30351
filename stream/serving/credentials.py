"""The worker's Kafka security settings in the form Faust takes.

The same ``STREAMREC_KAFKA_*`` variables configure every confluent-kafka client
(:func:`stream.kafka.config.security_config`); Faust's aiokafka clients take them as
credentials objects instead.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping

from faust import SASLCredentials, SSLCredentials
from faust.types.auth import CredentialsT

from model.errors import UserError
from stream.kafka.config import security_config


def faust_credentials(environ: Mapping[str, str] | None = None) -> CredentialsT | None:
    """The same ``STREAMREC_KAFKA_*`` security settings in the form Faust's workers take.

    None for a plaintext cluster. TLS uses the CA file (and, for mutual TLS, the client
    certificate and key) from the environment; SASL adds the mechanism and credentials.
    """
    config = security_config(environ)
    protocol = config.get("security.protocol", "PLAINTEXT").upper()
    if protocol not in ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"):
        raise UserError(
            f"STREAMREC_KAFKA_SECURITY_PROTOCOL={protocol!r} must be PLAINTEXT, "
            f"SSL, SASL_PLAINTEXT or SASL_SSL"
        )
    context = None
    if protocol.endswith("SSL"):
        try:
            context = ssl.create_default_context(cafile=config.get("ssl.ca.location"))
            if "ssl.certificate.location" in config:
                context.load_cert_chain(
                    config["ssl.certificate.location"], config.get("ssl.key.location")
                )
        except (OSError, ssl.SSLError) as exc:
            raise UserError(
                f"cannot load the TLS files from STREAMREC_KAFKA_SSL_*: {exc}"
            ) from None
    if protocol.startswith("SASL"):
        return SASLCredentials(
            username=config.get("sasl.username"),
            password=config.get("sasl.password"),
            mechanism=config.get("sasl.mechanism", "PLAIN"),
            ssl_context=context,
        )
    return SSLCredentials(context) if context is not None else None
